/* zoedge's counter-based noise kernel: Philox4x32-10, then N(0, 1) by Box-Muller, U[0, 1) or ±1.
 *
 * Value i of a draw with 64-bit key k is made from 32-bit word i of the Philox4x32-10 stream of k (N(0, 1),
 * U[0, 1)), or from bit i % 32 of word i / 32 (±1): word w is lane w % 4 of the block whose counter is
 * (w / 4 as 64 bits, 0, 0). See "Parallel random numbers:
 * as easy as 1, 2, 3" (Salmon et al., SC 2011) for the generator. So any range of a draw can be filled
 * on its own, by any thread, and gives the values of the whole draw.
 *
 * The floating-point work uses only +, -, *, /, sqrt and exact integer <-> float conversions, in an order
 * fixed by this source: IEEE 754 makes every result the same on every CPU, as long as the compiler
 * neither fuses a multiply and an add (-ffp-contract=off) nor reorders (no -ffast-math). Vector and
 * scalar code therefore agree bit for bit, and zoedge/noise/philox.py repeats the same operations in
 * torch as the reference (and the fallback without a C compiler); tests/test_philox.py checks that they
 * agree. log and sin/cos are zoedge's own short series, accurate to about 1e-7, not libm's.
 *
 * Build: at install time by setup.py (portable: no -march; on x86-64 with glibc the value loops are compiled
 * once per vector ISA below and the CPU picks one when the library loads), or at first use by philox.py with
 * cc -O3 -march=native -fopenmp -ffp-contract=off -fno-math-errno -shared -fPIC (without -march=native or
 * -fopenmp where the compiler refuses them). The values are the same in every build.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define KIND_NORMAL 0
#define KIND_UNIFORM 1
#define KIND_RADEMACHER 2

/* Philox4x32 multipliers and Weyl key increments (the published constants) */
#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u

/* float32 constants, written exactly (philox.py holds the same bit patterns) */
#define SQRT2   0x1.6a09e6p+0f
#define LN2_HI  0x1.62e4p-1f      /* ln 2 = LN2_HI + LN2_LO */
#define LN2_LO  0x1.7f7d1cp-20f
#define L3      0x1.555556p-2f    /* 1/3, 1/5, ...: 2 atanh(s) = 2s (1 + s^2/3 + s^4/5 + ...) */
#define L5      0x1.99999ap-3f
#define L7      0x1.24924ap-3f
#define L9      0x1.c71c72p-4f
#define L11     0x1.745d18p-4f
#define PI_4    0x1.921fb6p-1f
#define S3     -0x1.555556p-3f    /* sin t = t (1 + S3 t^2 + S5 t^4 + ...), |t| <= pi/4 */
#define S5      0x1.111112p-7f
#define S7     -0x1.a01a02p-13f
#define S9      0x1.71de3ap-19f
#define C2     -0x1p-1f           /* cos t = 1 + C2 t^2 + C4 t^4 + ... */
#define C4      0x1.555556p-5f
#define C6     -0x1.6c16c2p-10f
#define C8      0x1.a01a02p-16f
#define C10    -0x1.27e4fcp-22f
#define TWO_M24 0x1p-24f
#define TWO_M21 0x1p-21f

/* The sha256 of this file's source when setup.py built the library (philox.py refuses a library built from
 * another source); empty in a build made by philox.py, which names its file after the source instead. */
#ifndef ZOEDGE_PHILOX_SOURCE_SHA256
#define ZOEDGE_PHILOX_SOURCE_SHA256 ""
#endif
const char *zoedge_philox_source_sha256(void) { return ZOEDGE_PHILOX_SOURCE_SHA256; }

/* One copy of the value loops per x86-64 level (v4: AVX-512, v3: AVX2, the baseline), chosen when the library
 * loads (GCC / clang function multi-versioning: needs glibc's ifunc); elsewhere (aarch64, musl, other compilers)
 * one copy for the target the compiler was given. Plain C either way: the compiler vectorises the same loops. */
#if defined(__x86_64__) && defined(__GLIBC__) && defined(__has_attribute) && !defined(ZOEDGE_NO_CLONES)
#if __has_attribute(target_clones)
#define VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
#endif
#ifndef VECTOR_CLONES
#define VECTOR_CLONES
#endif

/* blocks per group: a group is 4 * GROUP_BLOCKS values, computed lane-parallel (vectorised) */
#define GROUP_BLOCKS 64
#define GROUP (4 * GROUP_BLOCKS)

static inline float as_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t as_uint(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* ln x for x in (0, 1]: x = m 2^e with m in [sqrt(1/2), sqrt(2)), ln m = 2 atanh((m - 1) / (m + 1)) */
static inline float log_unit(float x) {
    uint32_t bits = as_uint(x);
    int32_t e = (int32_t)(bits >> 23) - 127;
    float m = as_float((bits & 0x7fffffu) | 0x3f800000u);
    int32_t big = m > SQRT2;
    m = m * as_float(0x3f800000u - ((uint32_t)big << 23)); /* m or m / 2, without a branch */
    e += big;
    float f = m - 1.0f;
    float s = f / (2.0f + f);
    float s2 = s * s;
    float series = 1.0f + s2 * (L3 + s2 * (L5 + s2 * (L7 + s2 * (L9 + s2 * L11))));
    float ef = (float)e;
    return ef * LN2_HI + (ef * LN2_LO + 2.0f * s * series);
}

/* Box-Muller on words a, b: radius from a, angle 2 pi u from b, reduced to an octant */
static inline void box_muller(uint32_t a, uint32_t b, float *z_cos, float *z_sin) {
    float u1 = (float)(int32_t)((a >> 8) + 1u) * TWO_M24; /* (0, 1] */
    float r = __builtin_sqrtf(-2.0f * log_unit(u1));
    uint32_t v = b >> 8;                                   /* 24 bits: angle = 2 pi v / 2^24 */
    uint32_t octant = v >> 21;
    /* angle = q pi/2 + t with t in [-pi/4, pi/4): odd octants count back from the next quadrant */
    float y = (float)(int32_t)(v & 0x1fffffu) * TWO_M21 - (float)(int32_t)(octant & 1u);
    float t = y * PI_4;
    float t2 = t * t;
    float s = t * (1.0f + t2 * (S3 + t2 * (S5 + t2 * (S7 + t2 * S9))));
    float c = 1.0f + t2 * (C2 + t2 * (C4 + t2 * (C6 + t2 * (C8 + t2 * C10))));
    uint32_t q = ((octant + 1u) >> 1) & 3u;
    uint32_t odd = q & 1u;
    float sin_q = odd ? c : s, cos_q = odd ? s : c;         /* rotate by q quarter turns */
    sin_q = as_float(as_uint(sin_q) ^ ((q & 2u) << 30));
    cos_q = as_float(as_uint(cos_q) ^ (((q + 1u) & 2u) << 30));
    *z_cos = r * cos_q;
    *z_sin = r * sin_q;
}

/* the words of blocks [first, first + blocks) of the stream, lane by lane (x0[j] .. x3[j]: block first + j) */
static inline void philox_words(uint64_t first, int blocks, uint32_t k0, uint32_t k1, uint32_t *restrict x0,
                                uint32_t *restrict x1, uint32_t *restrict x2, uint32_t *restrict x3) {
    for (int j = 0; j < blocks; j++) {
        uint64_t block = first + (uint64_t)j;
        uint32_t c0 = (uint32_t)block, c1 = (uint32_t)(block >> 32), c2 = 0, c3 = 0;
        uint32_t a0 = k0, a1 = k1;
#pragma GCC unroll 10
        for (int round = 0; round < 10; round++) {
            uint64_t p0 = (uint64_t)PHILOX_M0 * c0, p1 = (uint64_t)PHILOX_M1 * c2;
            uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ a0, n2 = (uint32_t)(p0 >> 32) ^ c3 ^ a1;
            c1 = (uint32_t)p1;
            c3 = (uint32_t)p0;
            c0 = n0;
            c2 = n2;
            a0 += PHILOX_W0;
            a1 += PHILOX_W1;
        }
        x0[j] = c0; x1[j] = c1; x2[j] = c2; x3[j] = c3;
    }
}

/* values [g * GROUP, (g + 1) * GROUP) of the draw into buf: normal and uniform from words [g GROUP, (g + 1) GROUP),
 * one word per value; rademacher from words [g GROUP / 32, (g + 1) GROUP / 32), one bit per value */
VECTOR_CLONES static void fill_group(float *restrict buf, uint64_t g, uint32_t k0, uint32_t k1, int kind) {
    uint32_t x0[GROUP_BLOCKS], x1[GROUP_BLOCKS], x2[GROUP_BLOCKS], x3[GROUP_BLOCKS];
    float z0[GROUP_BLOCKS], z1[GROUP_BLOCKS], z2[GROUP_BLOCKS], z3[GROUP_BLOCKS];
    if (kind == KIND_RADEMACHER) { /* value i: bit i % 32 of word i / 32, set -> -1 (the sign bit of 1.0) */
        enum { BLOCKS = GROUP / 128 };
        uint32_t words[4 * BLOCKS];
        philox_words(g * BLOCKS, BLOCKS, k0, k1, x0, x1, x2, x3);
        for (int j = 0; j < BLOCKS; j++) {
            words[4 * j] = x0[j]; words[4 * j + 1] = x1[j]; words[4 * j + 2] = x2[j]; words[4 * j + 3] = x3[j];
        }
        for (int i = 0; i < GROUP; i++)
            buf[i] = as_float(0x3f800000u | (((words[i >> 5] >> (i & 31)) & 1u) << 31));
        return;
    }
    philox_words(g * GROUP_BLOCKS, GROUP_BLOCKS, k0, k1, x0, x1, x2, x3);
    if (kind == KIND_NORMAL) {
        for (int j = 0; j < GROUP_BLOCKS; j++) box_muller(x0[j], x1[j], &z0[j], &z1[j]);
        for (int j = 0; j < GROUP_BLOCKS; j++) box_muller(x2[j], x3[j], &z2[j], &z3[j]);
    } else {
        for (int j = 0; j < GROUP_BLOCKS; j++) {
            z0[j] = (float)(int32_t)(x0[j] >> 8) * TWO_M24;
            z1[j] = (float)(int32_t)(x1[j] >> 8) * TWO_M24;
            z2[j] = (float)(int32_t)(x2[j] >> 8) * TWO_M24;
            z3[j] = (float)(int32_t)(x3[j] >> 8) * TWO_M24;
        }
    }
    for (int j = 0; j < GROUP_BLOCKS; j++) {
        buf[4 * j] = z0[j]; buf[4 * j + 1] = z1[j]; buf[4 * j + 2] = z2[j]; buf[4 * j + 3] = z3[j];
    }
}

/* out[0, n) = values [start, start + n) of the draw with key `key` */
void zoedge_philox_fill(float *out, int64_t n, int64_t start, uint64_t key, int kind);

/* one piece of a draw, for zoedge_philox_fill_many (philox.py builds an array of these) */
typedef struct {
    float *out;
    int64_t n;
    int64_t start;
    uint64_t key;
    int64_t kind;
} zoedge_fill_job;

/* the jobs, cut into pieces of at most `piece` values, on `threads` threads of the OpenMP runtime the process
 * already runs (torch's: built with -fopenmp, this library binds to the libgomp.so.1 torch loaded, so its
 * threads are torch's intra-op threads, already awake after an operation, instead of more threads competing
 * with them); serially without OpenMP. The values do not depend on the pieces. */
void zoedge_philox_fill_many(const zoedge_fill_job *jobs, int64_t count, int64_t piece, int threads) {
    int64_t total = 0;
    for (int64_t i = 0; i < count; i++) total += (jobs[i].n + piece - 1) / piece;
    zoedge_fill_job *pieces = total > 0 ? malloc((size_t)total * sizeof(zoedge_fill_job)) : NULL;
    if (pieces == NULL) { /* nothing to do, or no memory for the table: whole jobs, one by one */
        for (int64_t i = 0; i < count; i++)
            zoedge_philox_fill(jobs[i].out, jobs[i].n, jobs[i].start, jobs[i].key, (int)jobs[i].kind);
        return;
    }
    int64_t k = 0;
    for (int64_t i = 0; i < count; i++)
        for (int64_t lo = 0; lo < jobs[i].n; lo += piece) {
            pieces[k] = jobs[i];
            pieces[k].out = jobs[i].out + lo;
            pieces[k].start = jobs[i].start + lo;
            pieces[k].n = jobs[i].n - lo < piece ? jobs[i].n - lo : piece;
            k++;
        }
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1 && total > 1)
    for (int64_t i = 0; i < total; i++)
        zoedge_philox_fill(pieces[i].out, pieces[i].n, pieces[i].start, pieces[i].key, (int)pieces[i].kind);
    free(pieces);
}

/* 1 when built with OpenMP (zoedge_philox_fill_many runs in parallel), else 0 */
int zoedge_philox_parallel(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

void zoedge_philox_fill(float *out, int64_t n, int64_t start, uint64_t key, int kind) {
    uint32_t k0 = (uint32_t)key, k1 = (uint32_t)(key >> 32);
    float buf[GROUP];
    int64_t end = start + n;
    for (int64_t g = start / GROUP; g * GROUP < end; g++) {
        int64_t lo = g * GROUP, hi = lo + GROUP;
        if (lo >= start && hi <= end) {
            fill_group(out + (lo - start), (uint64_t)g, k0, k1, kind);
        } else {
            int64_t a = lo > start ? lo : start, b = hi < end ? hi : end;
            fill_group(buf, (uint64_t)g, k0, k1, kind);
            memcpy(out + (a - start), buf + (a - lo), (size_t)(b - a) * sizeof(float));
        }
    }
}

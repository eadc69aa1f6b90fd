"""Counter-based noise, below the runtime: sources and their variants (:mod:`zoedge.noise.source`), the noise
cache (:mod:`zoedge.noise.cache`) and the CPU's Philox kernel (:mod:`zoedge.noise.philox`)."""

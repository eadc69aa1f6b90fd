"""ZO-SignSGD with momentum, an out-of-tree plugin: g = (L(θ + εz) − L(θ − εz)) / 2ε, m ← βm + (1 − β) g z,
θ ← θ − η sign(m). The momentum m is declared state: the framework keeps, streams and checkpoints it."""
import torch

from zoedge.optim.api import StateSpec, Update, ZOOptimizer


class SignMomentum(ZOOptimizer):
    def __init__(self, *, seed: int = 0, lr: float = 1e-4, eps: float = 1e-3, beta: float = 0.9) -> None:
        super().__init__(seed=seed, lr=lr)
        self.eps, self.beta = eps, beta

    def state_spec(self, name, shape):
        return {"m": StateSpec(torch.float32)}

    def z(self, step):
        return lambda name: self.noise.draw(step, name, "z0")

    def draw(self, block):
        block.noise("z0", self.z(self.t))

    def perturb(self, block, p):
        return {n: block.perturbed(n, "z0", self.eps if p == 0 else -self.eps) for n in block.tensors}

    def end_step(self, losses):
        g = (float(losses[0]) - float(losses[1])) / (2 * self.eps)
        return Update({"g": g, "lr": self.lr}, {"projected_grad": g})

    def apply(self, block, update):
        z, m = block.noise("z0", self.z(update.step)), self.state_of(block, "m")
        for part in block.parts():
            mom = part.of(m[part.name])
            mom.mul_(self.beta).add_(part.noise(z), alpha=(1 - self.beta) * update["g"])
            part.tensor.sub_(mom.sign(), alpha=update["lr"])

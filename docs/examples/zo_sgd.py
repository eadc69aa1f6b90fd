from zoedge.optim.api import Update, ZOOptimizer, register_optimizer

@register_optimizer("zo-sgd")
class ZOSGD(ZOOptimizer):
    """ZO-SGD (MeZO with one direction): g = (L(θ + εz) − L(θ − εz)) / 2ε, θ ← θ − η g z."""
    replayable = True  # θ is the base after apply of each update: checkpoints may hold the update log

    def __init__(self, *, seed: int = 0, lr: float = 1e-5, eps: float = 1e-3) -> None:
        super().__init__(seed=seed, lr=lr)
        self.eps = eps

    def draw(self, block):
        block.noise("z0", lambda name: self.noise.draw(self.t, name, "z0"))

    def perturb(self, block, p):
        return {n: block.perturbed(n, "z0", self.eps if p == 0 else -self.eps) for n in block.tensors}

    def end_step(self, losses):
        g = (float(losses[0]) - float(losses[1])) / (2 * self.eps)
        return Update({"g": g, "lr": self.lr}, {"projected_grad": g})

    def apply(self, block, update):
        z = block.noise("z0", lambda name: self.noise.draw(update.step, name, "z0"))
        for part in block.parts():
            part.add_(z, alpha=-update["lr"] * update["g"])

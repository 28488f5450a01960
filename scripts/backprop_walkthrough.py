"""Backpropagation by hand, one training step of the 3-4-2 sigmoid network, every number checked.

    python scripts/backprop_walkthrough.py                 # forward, loss, local derivatives, chain rule, update
    python scripts/backprop_walkthrough.py --chain-rule 2  # the chain rule on f(x) = (x² + 1)³ at x = 2
    python scripts/backprop_walkthrough.py --fix           # three classic bugs, each beside its correct version

The network is the one of `python train.py experiment=toy_xor`: 3 inputs, 4 sigmoid hidden units, 2 sigmoid
outputs, weights laid out (out, in) as in nn.Linear, so z = x·Wᵀ + b. One input x, its 3-bit parity as a one-hot
target t, the mean squared error, one step of plain SGD. Every quantity is computed three times, in float64:
  by hand      the formulas printed beside it, written out with tensors;
  autograd     the same network from torch ops, `loss.backward()`;
  gradlab      the network from gradlab's hand-written Functions (src/gradlab/autograd), `loss.backward()`.
A ✔ means all three agree to 1e-12; any ✘ makes the script exit with status 1.
"""

import argparse
import sys

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gradlab.autograd import linear, mse, sigmoid

TOL = 1e-12
console = Console()


class Checks:
    """Collects every comparison so the script can fail at the end if one did not hold."""

    def __init__(self):
        self.failed: list[str] = []

    def mark(self, name: str, mine: torch.Tensor, *references: torch.Tensor) -> str:
        ok = all(torch.allclose(mine, ref, rtol=0, atol=TOL) for ref in references)
        if not ok:
            self.failed.append(name)
        return "[green]✔[/]" if ok else "[bold red]✘[/]"

    def mark_close(self, name: str, mine: torch.Tensor, estimate: torch.Tensor, tol: float = 1e-8) -> str:
        """For a finite-difference estimate, exact only to about eps²: a looser tolerance."""
        ok = bool(torch.allclose(mine, estimate, rtol=0, atol=tol))
        if not ok:
            self.failed.append(name)
        return "[green]✔[/]" if ok else "[bold red]✘[/]"


def show(value: torch.Tensor) -> str:
    rows = value.reshape(-1, value.shape[-1]) if value.dim() else value.reshape(1, 1)
    return escape("\n".join("[" + "  ".join(f"{v: .6f}" for v in row.tolist()) + "]" for row in rows))


def table(title: str, rows: list[tuple[str, str, torch.Tensor, str]], checks: Checks,
          refs: dict[str, tuple[torch.Tensor, ...]]) -> None:
    out = Table(title=title, title_justify="left", show_lines=True)
    for column in ("quantity", "formula", "shape", "value", "= autograd, gradlab"):
        out.add_column(column, justify="center" if column.startswith("=") else "left")
    for name, formula, value, _ in rows:
        out.add_row(name, escape(formula), str(tuple(value.shape)), show(value), checks.mark(name, value, *refs[name]))
    console.print(out)


# ---- the network, three ways --------------------------------------------------------------------------------
def parameters(seed: int) -> dict[str, torch.Tensor]:
    """W1 (4, 3), b1 (4,), W2 (2, 4), b2 (2,): Xavier-uniform with sigmoid's gain, as ManualMLP initializes."""
    gen = torch.Generator().manual_seed(seed)
    params = {}
    for name, (n_out, n_in) in (("1", (4, 3)), ("2", (2, 4))):
        bound = (6 / (n_in + n_out)) ** 0.5
        params[f"W{name}"] = (torch.rand(n_out, n_in, generator=gen, dtype=torch.float64) * 2 - 1) * bound
        params[f"b{name}"] = torch.rand(n_out, generator=gen, dtype=torch.float64) * 0.2 - 0.1
    return params


def forward_torch(x, t, p, ops):
    """The same forward through `ops`: (linear, sigmoid, mse) of autograd or of gradlab; keeps every intermediate."""
    lin, sig, loss_fn = ops
    z1 = lin(x, p["W1"], p["b1"])
    a1 = sig(z1)
    z2 = lin(a1, p["W2"], p["b2"])
    a2 = sig(z2)
    for v in (z1, a1, z2, a2):
        v.retain_grad()  # so the chain-rule products can be compared with what backward computed
    loss = loss_fn(a2, t)
    loss.backward()
    return {"z1": z1, "a1": a1, "z2": z2, "a2": a2, "loss": loss}


def sigmoid_slopes(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dσ/dz elementwise from autograd's sigmoid and from gradlab's hand-written Sigmoid backward."""
    slopes = []
    for sig in (torch.sigmoid, sigmoid):
        leaf = z.detach().clone().requires_grad_()
        sig(leaf).sum().backward()                 # an upstream gradient of ones: backward returns σ'(z) itself
        slopes.append(leaf.grad)
    return tuple(slopes)


AUTOGRAD = (F.linear, torch.sigmoid, F.mse_loss)
GRADLAB = (linear, sigmoid, mse)


def walkthrough(seed: int, lr: float) -> int:
    checks = Checks()
    x = torch.tensor([[1.0, -1.0, 1.0]], dtype=torch.float64)               # (1, 3): the bits 1, 0, 1
    t = torch.tensor([[1.0, 0.0]], dtype=torch.float64)                     # (1, 2): parity 0 → class 0, one-hot
    p = parameters(seed)
    runs = {}
    for name, ops in (("autograd", AUTOGRAD), ("gradlab", GRADLAB)):
        leaves = {k: v.clone().requires_grad_() for k, v in p.items()}
        runs[name] = (forward_torch(x, t, leaves, ops), leaves)

    def refs(key, grad=False, param=False):
        pick = (lambda r, q: q[key].grad) if param else (lambda r, q: r[key].grad) if grad else (lambda r, q: r[key])
        return tuple(pick(r, q).detach() for r, q in (runs["autograd"], runs["gradlab"]))

    console.print(f"[bold]Backprop by hand[/]: the 3-4-2 sigmoid network, one step of SGD (lr {lr}), float64, "
                  f"seed {seed}")
    console.print(f"x = {x.tolist()[0]}  (input, 1×3)    t = {t.tolist()[0]}  (target, one-hot, 1×2)\n")

    # ---- 1. forward ------------------------------------------------------------------------------------------
    z1 = x @ p["W1"].T + p["b1"]
    a1 = torch.sigmoid(z1)
    z2 = a1 @ p["W2"].T + p["b2"]
    a2 = torch.sigmoid(z2)
    table("1. Forward pass", [("z₁", "x·W₁ᵀ + b₁", z1, ""), ("a₁", "σ(z₁)", a1, ""),
                              ("z₂", "a₁·W₂ᵀ + b₂", z2, ""), ("a₂", "σ(z₂)", a2, "")], checks,
          {"z₁": refs("z1"), "a₁": refs("a1"), "z₂": refs("z2"), "a₂": refs("a2")})

    # ---- 2. the error ---------------------------------------------------------------------------------------
    n = a2.numel()
    mse_loss = ((a2 - t) ** 2).sum() / n
    bce_loss = -(t * torch.log(a2) + (1 - t) * torch.log(1 - a2)).sum() / n
    table("2. The error (the step below descends the MSE)", [
        ("MSE", "Σ (a₂ - t)² / N,  N = 2", mse_loss, ""),
        ("BCE", "-Σ [t·log a₂ + (1-t)·log(1-a₂)] / N", bce_loss, ""),
    ], checks, {"MSE": refs("loss"), "BCE": (F.binary_cross_entropy(a2, t), F.binary_cross_entropy_with_logits(z2, t))})

    # ---- 3. local derivatives -----------------------------------------------------------------------------
    dL_da2 = 2 * (a2 - t) / n           # ∂MSE/∂a₂: the 2 comes from the square, the 1/N from the mean
    da2_dz2 = a2 * (1 - a2)             # σ'(z₂) = σ(1-σ), read off the output
    da1_dz1 = a1 * (1 - a1)             # σ'(z₁)
    table("3. Local derivatives (each factor alone)", [
        ("∂L/∂a₂", "2(a₂ - t)/N", dL_da2, ""),
        ("σ'(z₂)", "a₂(1 - a₂)", da2_dz2, ""),
        ("σ'(z₁)", "a₁(1 - a₁)", da1_dz1, ""),
    ], checks, {"∂L/∂a₂": refs("a2", grad=True), "σ'(z₂)": sigmoid_slopes(z2), "σ'(z₁)": sigmoid_slopes(z1)})

    # ---- 4. the chain rule, layer by layer ------------------------------------------------------------------
    delta2 = dL_da2 * da2_dz2            # δ₂ = ∂L/∂z₂ (1, 2)
    dW2 = delta2.T @ a1                  # ∂L/∂W₂ (2, 4): ∂z₂/∂W₂ = a₁
    db2 = delta2.sum(0)                  # ∂L/∂b₂ (2,): ∂z₂/∂b₂ = 1
    dL_da1 = delta2 @ p["W2"]            # ∂L/∂a₁ (1, 4): ∂z₂/∂a₁ = W₂
    delta1 = dL_da1 * da1_dz1            # δ₁ = ∂L/∂z₁ (1, 4)
    dW1 = delta1.T @ x                   # ∂L/∂W₁ (4, 3): ∂z₁/∂W₁ = x
    db1 = delta1.sum(0)                  # ∂L/∂b₁ (4,)
    table("4. Backward: the chain rule multiplies the local derivatives", [
        ("δ₂ = ∂L/∂z₂", "∂L/∂a₂ ⊙ σ'(z₂)", delta2, ""),
        ("∂L/∂W₂", "δ₂ᵀ·a₁", dW2, ""),
        ("∂L/∂b₂", "Σ_batch δ₂", db2, ""),
        ("∂L/∂a₁", "δ₂·W₂", dL_da1, ""),
        ("δ₁ = ∂L/∂z₁", "∂L/∂a₁ ⊙ σ'(z₁)", delta1, ""),
        ("∂L/∂W₁", "δ₁ᵀ·x", dW1, ""),
        ("∂L/∂b₁", "Σ_batch δ₁", db1, ""),
    ], checks, {"δ₂ = ∂L/∂z₂": refs("z2", grad=True), "∂L/∂W₂": refs("W2", param=True),
                "∂L/∂b₂": refs("b2", param=True), "∂L/∂a₁": refs("a1", grad=True),
                "δ₁ = ∂L/∂z₁": refs("z1", grad=True), "∂L/∂W₁": refs("W1", param=True),
                "∂L/∂b₁": refs("b1", param=True)})

    # ---- 5. the update, and the loss after it ---------------------------------------------------------------
    grads = {"W1": dW1, "b1": db1, "W2": dW2, "b2": db2}
    new = {k: p[k] - lr * grads[k] for k in p}                             # w ← w - lr·∂L/∂w
    ref_new = []
    for _, leaves in runs.values():
        optimizer = torch.optim.SGD(list(leaves.values()), lr=lr)
        optimizer.step()
        ref_new.append({k: v.detach() for k, v in leaves.items()})
    after = ((torch.sigmoid(torch.sigmoid(x @ new["W1"].T + new["b1"]) @ new["W2"].T + new["b2"]) - t) ** 2).mean()
    ref_after = [F.mse_loss(torch.sigmoid(F.linear(torch.sigmoid(F.linear(x, q["W1"], q["b1"])), q["W2"], q["b2"])), t)
                 for q in ref_new]
    table(f"5. The update (plain SGD, lr {lr}) and the loss after it", [
        ("W₂ new", "W₂ - lr·∂L/∂W₂", new["W2"], ""),
        ("b₂ new", "b₂ - lr·∂L/∂b₂", new["b2"], ""),
        ("W₁ new", "W₁ - lr·∂L/∂W₁", new["W1"], ""),
        ("b₁ new", "b₁ - lr·∂L/∂b₁", new["b1"], ""),
        ("MSE after", "the forward pass again", after, ""),
    ], checks, {"W₂ new": tuple(q["W2"] for q in ref_new), "b₂ new": tuple(q["b2"] for q in ref_new),
                "W₁ new": tuple(q["W1"] for q in ref_new), "b₁ new": tuple(q["b1"] for q in ref_new),
                "MSE after": tuple(ref_after)})
    console.print(f"The loss went from {mse_loss.item():.6f} to {after.item():.6f}: one step downhill, "
                  f"{'as it must for a small enough lr' if after < mse_loss else 'uphill: lr too large'}.")
    return report(checks)


def report(checks: Checks, ok: str = "every number equals autograd's and gradlab's hand-written backward "
                                       "(to 1e-12)") -> int:
    if checks.failed:
        console.print(f"[bold red]✘ {len(checks.failed)} checks failed: {', '.join(checks.failed)}[/]")
        return 1
    console.print(f"[bold green]✔ {ok}.[/]")
    return 0


# ---- the chain rule on one variable -------------------------------------------------------------------------
def chain_rule(x0: float) -> int:
    checks = Checks()
    x = torch.tensor(x0, dtype=torch.float64, requires_grad=True)
    a = x ** 2                       # a = x²
    b = a + 1                        # b = a + 1
    c = b ** 3                       # c = b³ = f(x)
    c.backward()
    da_dx, db_da, dc_db = 2 * x.detach(), torch.tensor(1.0, dtype=torch.float64), 3 * b.detach() ** 2
    product = dc_db * db_da * da_dx
    closed = 6 * x.detach() * (x.detach() ** 2 + 1) ** 2
    out = Table(title=f"The chain rule on f(x) = (x² + 1)³ at x = {x0:g}", title_justify="left")
    for column in ("step", "formula", "value"):
        out.add_column(column)
    for step, formula, value in (("a", "x²", a), ("b", "a + 1", b), ("c = f(x)", "b³", c),
                                 ("da/dx", "2x", da_dx), ("db/da", "1", db_da), ("dc/db", "3b²", dc_db),
                                 ("df/dx", "dc/db · db/da · da/dx", product)):
        out.add_row(step, formula, f"{value.item():.6f}")
    console.print(out)
    console.print(f"df/dx = {product.item():.6f};  6x(x² + 1)² = {closed.item():.6f} "
                  f"{checks.mark('closed form', product, closed)};  autograd: {x.grad.item():.6f} "
                  f"{checks.mark('autograd', product, x.grad)}")
    return report(checks, "the product of the local derivatives equals the closed form and autograd")


# ---- three classic bugs -------------------------------------------------------------------------------------
def classic_bugs(seed: int) -> int:
    """Each bug beside its fix, with the number that shows the difference. Returns 0 when every fix holds."""
    checks = Checks()
    p = parameters(seed)
    x = torch.tensor([[1.0, -1.0, 1.0]], dtype=torch.float64)
    t = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    out = Table(title="Three classic bugs, each beside its fix", title_justify="left", show_lines=True)
    for column in ("bug", "what it computes", "the fix", "the number that shows it"):
        out.add_column(column)

    # 1. the forward pass run twice: with dropout (or anything random or stateful) the second pass is another
    #    network, so the gradient taken belongs to a loss that was never reported.
    def forward(q, gen):
        h = torch.sigmoid(x @ q["W1"].T + q["b1"])
        mask = (torch.rand(h.shape, generator=gen, dtype=h.dtype) >= 0.5) / 0.5  # dropout, p = 0.5
        return torch.sigmoid((h * mask) @ q["W2"].T + q["b2"])

    gen = torch.Generator().manual_seed(seed)
    leaves = {k: v.clone().requires_grad_() for k, v in p.items()}
    reported = F.mse_loss(forward(leaves, gen), t)                             # what the log shows
    twice = F.mse_loss(forward(leaves, gen), t)                                # the bug: forward again for backward
    g_twice = torch.autograd.grad(twice, leaves["W1"], retain_graph=True)[0]
    g_once = torch.autograd.grad(reported, leaves["W1"])[0]                    # the fix: backward from one forward
    out.add_row("forward pass run twice", f"reports loss {reported.item():.4f}, descends loss {twice.item():.4f}",
                "one forward; backward from its own output",
                f"‖∂W₁ of the 2nd pass - ∂W₁ of the reported loss‖ = {(g_twice - g_once).norm().item():.3g}")

    # 2. `2 * (output - error)` with error = target - output: the derivative of the MSE is 2(output - target)/N.
    a2 = forward_torch(x, t, {k: v.clone().requires_grad_() for k, v in p.items()}, AUTOGRAD)["a2"].detach()
    error = t - a2
    wrong = 2 * (a2 - error)                                                   # = 2(2·a₂ - t): not a derivative of L
    right = 2 * (a2 - t) / a2.numel()
    eps, i = 1e-6, (0, 0)
    up, down = a2.clone(), a2.clone()
    up[i] += eps
    down[i] -= eps
    finite = (F.mse_loss(up, t) - F.mse_loss(down, t)) / (2 * eps)           # central difference of L in a₂[0]
    out.add_row("`2 * (output - error)`", f"∂L/∂a₂[0] = {wrong[i].item():.6f}", "2(a₂ - t)/N",
                f"fix {right[i].item():.6f} ≈ {finite.item():.6f}, a finite difference "
                f"{checks.mark_close('MSE derivative', right[i], finite)}; the bug is off by "
                f"{abs(wrong[i] - finite).item():.3g}")

    # 3. random numbers standing in for gradients in the vanishing-gradient demo: they vanish only if the demo's
    #    own random scale makes them; the real gradient of a deep sigmoid stack shrinks by σ' <= 1/4 per layer.
    gen = torch.Generator().manual_seed(seed)
    depth, width = 10, 32
    weights = [torch.empty(width, width, dtype=torch.float64).uniform_(-1, 1, generator=gen) * (6 / (2 * width)) ** 0.5
               for _ in range(depth)]
    for w in weights:
        w.requires_grad_()
    h = torch.randn(16, width, generator=gen, dtype=torch.float64)
    for w in weights:
        h = torch.sigmoid(h @ w.T)
    h.square().mean().backward()
    real = weights[0].grad.norm() / weights[-1].grad.norm()
    stand_in = torch.randn(width, width, generator=gen).norm() / torch.randn(width, width, generator=gen).norm()
    out.add_row("random numbers as gradients", f"first/last layer ‖grad‖ = {stand_in.item():.3g} (no vanishing)",
                "measure ‖∂L/∂W‖ of each layer after a real backward",
                f"real first/last = {real.item():.3g} over {depth} sigmoid layers (σ' ≤ 1/4 per layer)")
    checks.mark("real gradients vanish", torch.tensor(float(real < 1e-2)), torch.tensor(1.0))
    console.print(out)
    return report(checks, "each fix holds: its derivative matches a finite difference, its gradients vanish for real")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chain-rule", type=float, metavar="X", help="the chain rule on f(x) = (x² + 1)³ at X")
    parser.add_argument("--fix", action="store_true", help="three classic bugs, each beside its correct version")
    parser.add_argument("--seed", type=int, default=42, help="draws the weights (default 42)")
    parser.add_argument("--lr", type=float, default=0.5, help="SGD learning rate (default 0.5, as experiment=toy_xor)")
    args = parser.parse_args(argv)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # every number of the lesson in float64; the caller's default restored after
    try:
        if args.chain_rule is not None:
            return chain_rule(args.chain_rule)
        if args.fix:
            return classic_bugs(args.seed)
        return walkthrough(args.seed, args.lr)
    finally:
        torch.set_default_dtype(before)


if __name__ == "__main__":
    sys.exit(main())

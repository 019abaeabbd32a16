"""Cost of the patch attacks on CPU (issue: attacks benchmark).

(1) GAP iteration time, triqdef ``AdversarialPatch`` vs IBM ART's
    ``AdversarialPatchPyTorch``, in one process on the same model, batch, square
    patch size and EOT settings: one random transform per image per iteration
    (rotation in [-22.5, 22.5] degrees, scale in [0.9, 1.1] times the patch
    side, random location), Adam, untargeted. ART takes the scale relative to
    the image, so its ``scale_min/max`` are ``0.9/1.1 * patch / image``. Each
    side runs ``--iters`` iterations in one call (``gap(x, y)`` with
    ``steps=iters``; ART's ``generate`` with ``max_iter=iters`` on exactly one
    batch), so per-call overheads are amortised alike; the figure is the best
    of ``--repeats`` calls divided by ``iters``, and the ratio ART / triqdef.
    The ``linear`` row (Flatten + Linear on 3x32x32) isolates the attacks' own
    pipeline (transforms, overlay, optimizer); the CNN rows add the model's
    forward and backward, which both sides pay (ART also computes parameter
    gradients, triqdef only the patch's).
(2) LAVAN throughput: images attacked per second with ``--lavan-steps`` sign
    steps, SmallCNN on 28x28 (5x5 patch) and ResNet-20 on 32x32 (6x6 patch).
(3) DPR throughput: the same settings as LAVAN's SmallCNN row (``--lavan-batch``
    images, ``--lavan-steps`` steps, the area of a 5x5 patch in a 10x10 box, one
    restart, no EOT), images attacked per second.
(4) PatchAttack throughput: SmallCNN on 28x28, 5x5 patch, ``--patch-batch`` images
    labelled with the model's own clean predictions (so every image starts correctly
    classified and the search spends queries), at most ``--patch-queries`` model
    evaluations per image (``rl_batch`` 20), textures fitted beforehand on
    ``--patch-batch`` other random images (not timed): images per second, mean queries
    per image (an image stops at its first success; this untrained model is rarely
    fooled, so the mean is close to the budget: the cost of a full search) and queries
    per second.

ART is not a triqdef dependency and is imported only here. Install it outside
the project and point ``--art-path`` at it::

    .venv/bin/python -m pip install --target /tmp/artpkgs --no-deps \\
        adversarial-robustness-toolbox six
    .venv/bin/python benchmarks/attacks.py --art-path /tmp/artpkgs

Options: ``--batch 32 --iters 10 --repeats 3 --lavan-batch 64 --lavan-steps 20
--patch-batch 64 --patch-queries 100 --threads N --device cpu|cuda --skip-art``.
Without ART the GAP comparison is skipped with the install hint above.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

from triqdef.attacks import DPR, LAVAN, AdversarialPatch, PatchAttack
from triqdef.models import SmallCNN, resnet20

ROTATION, SCALES = 22.5, (0.9, 1.1)
INSTALL_HINT = (
    "IBM ART is not installed; install it outside the project, e.g.\n"
    "  .venv/bin/python -m pip install --target /tmp/artpkgs --no-deps "
    "adversarial-robustness-toolbox six\n"
    "and rerun with --art-path /tmp/artpkgs "
    "(or: pip install adversarial-robustness-toolbox)"
)


def data(batch: int, channels: int, size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, channels, size, size, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    return x, y


def model(name: str) -> tuple[torch.nn.Module, int, int]:
    """(model in eval mode, channels, image side)."""
    torch.manual_seed(0)
    if name == "resnet20":
        return resnet20().eval(), 3, 32
    if name == "linear":  # the cheapest model: the attack's own cost dominates
        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
        return net.eval(), 3, 32
    return SmallCNN().eval(), 1, 28


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, mkldnn/cuDNN primitives, lazy imports
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return min(times)


def gap_triqdef(net, x, y, patch: int, iters: int, repeats: int) -> float:
    def run():
        gap = AdversarialPatch(
            net,
            patch,
            steps=iters,
            step_size=0.01,
            optimizer="adam",
            eot_samples=1,
            max_rotation=ROTATION,
            scale_range=SCALES,
            seed=0,
        )
        gap(x, y)

    return best_time(run, repeats) / iters


def import_art(path: str | None):
    if path:
        sys.path.insert(0, path)
    try:
        from art.attacks.evasion import AdversarialPatchPyTorch
        from art.estimators.classification import PyTorchClassifier
    except ImportError as exc:
        print(f"{INSTALL_HINT}\n(import failed: {exc})")
        return None
    return AdversarialPatchPyTorch, PyTorchClassifier


def gap_art(art, net, x, y, patch: int, iters: int, repeats: int) -> float:
    attack_cls, classifier_cls = art
    c, side = x.shape[1], x.shape[-1]
    clf = classifier_cls(
        model=net,
        loss=torch.nn.CrossEntropyLoss(),
        input_shape=tuple(x.shape[1:]),
        nb_classes=10,
        clip_values=(0.0, 1.0),
        channels_first=True,
        device_type="gpu" if x.is_cuda else "cpu",
    )
    x_np = x.cpu().numpy()
    y_np = torch.nn.functional.one_hot(y, 10).float().cpu().numpy()

    def run():
        attack = attack_cls(
            clf,
            rotation_max=ROTATION,
            scale_min=SCALES[0] * patch / side,
            scale_max=SCALES[1] * patch / side,
            learning_rate=0.01,
            max_iter=iters,
            batch_size=x.shape[0],
            patch_shape=(c, patch, patch),
            patch_type="square",
            optimizer="Adam",
            targeted=False,
            verbose=False,
        )
        attack.generate(x=x_np, y=y_np)

    return best_time(run, repeats) / iters


def lavan_throughput(net, x, y, patch: int, steps: int, repeats: int) -> float:
    def run():
        LAVAN(net, patch, steps=steps, step_size=0.05, seed=0)(x, y)

    return x.shape[0] / best_time(run, repeats)


def dpr_throughput(net, x, y, patch: int, steps: int, repeats: int) -> float:
    def run():
        DPR(net, patch, steps=steps, step_size=0.05, seed=0)(x, y)

    return x.shape[0] / best_time(run, repeats)


def patchattack_throughput(net, x, patch: int, queries: int, repeats: int) -> tuple[float, float]:
    """(images per second, mean queries per image) against ``net``'s own clean predictions."""
    with torch.no_grad():
        y = net(x).argmax(1)
    xt, yt = data(x.shape[0], x.shape[1], x.shape[-1], seed=1)
    textures = PatchAttack(torch.nn.Identity()).fit_textures(
        xt.to(x.device), yt.to(x.device), seed=0
    )
    used = []

    def run():
        attack = PatchAttack(
            net,
            patch,
            queries=queries,
            textures=textures.textures,
            texture_labels=textures.texture_labels,
            seed=0,
        )
        attack(x, y)
        used.append(attack.queries_used.double().mean().item())

    return x.shape[0] / best_time(run, repeats), used[-1]


def main(argv=None) -> list[dict]:
    """Print the tables; returns the throughput rows of (2)-(4) as dicts."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--lavan-batch", type=int, default=64)
    p.add_argument("--lavan-steps", type=int, default=20)
    p.add_argument("--patch-batch", type=int, default=64)
    p.add_argument("--patch-queries", type=int, default=100)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu (the comparison's setting) or cuda")
    p.add_argument("--art-path", default=None, help="folder holding the `art` package")
    p.add_argument("--skip-art", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
        f"device {args.device}"
        + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else "")
    )
    dev = torch.device(args.device)

    print(f"\n(1) GAP, time per iteration (batch {args.batch}, EOT 1/image, Adam)")
    art = None if args.skip_art else import_art(args.art_path)
    rows = []
    for name, patch in (("linear", 6), ("smallcnn", 5), ("resnet20", 6)):
        net, c, side = model(name)
        net = net.to(dev)
        x, y = (t.to(dev) for t in data(args.batch, c, side))
        ours = gap_triqdef(net, x, y, patch, args.iters, args.repeats)
        theirs = gap_art(art, net, x, y, patch, args.iters, args.repeats) if art else None
        rows.append((f"{name} {side}x{side}", f"{patch}x{patch}", ours, theirs))
    print(f"{'model':<16}{'patch':>7}{'triqdef ms':>12}{'ART ms':>10}{'ART/triqdef':>13}")
    for label, patch, ours, theirs in rows:
        art_ms = f"{theirs * 1e3:10.1f}" if theirs else f"{'-':>10}"
        ratio = f"{theirs / ours:12.1f}x" if theirs else f"{'-':>13}"
        print(f"{label:<16}{patch:>7}{ours * 1e3:12.1f}{art_ms}{ratio}")

    print(
        f"\n(2) LAVAN throughput ({args.lavan_steps} steps, batch {args.lavan_batch}, "
        "1 restart, no location search)"
    )
    print(f"{'model':<16}{'patch':>7}{'images/s':>10}{'image-steps/s':>15}")
    results = []
    for name, patch in (("smallcnn", 5), ("resnet20", 6)):
        net, c, side = model(name)
        net = net.to(dev)
        x, y = (t.to(dev) for t in data(args.lavan_batch, c, side))
        ips = lavan_throughput(net, x, y, patch, args.lavan_steps, args.repeats)
        label = f"{name} {side}x{side}"
        print(f"{label:<16}{f'{patch}x{patch}':>7}{ips:10.1f}{ips * args.lavan_steps:15.0f}")
        results.append({"attack": "lavan", "model": label, "images_per_s": ips})

    print(
        f"\n(3) DPR throughput ({args.lavan_steps} steps, batch {args.lavan_batch}, "
        "1 restart, no EOT; area of the patch, 2x box)"
    )
    print(f"{'model':<16}{'patch':>7}{'images/s':>10}{'image-steps/s':>15}")
    net, c, side = model("smallcnn")
    net = net.to(dev)
    x, y = (t.to(dev) for t in data(args.lavan_batch, c, side))
    ips = dpr_throughput(net, x, y, 5, args.lavan_steps, args.repeats)
    label = f"smallcnn {side}x{side}"
    print(f"{label:<16}{'5x5':>7}{ips:10.1f}{ips * args.lavan_steps:15.0f}")
    results.append({"attack": "dpr", "model": label, "images_per_s": ips})

    print(
        f"\n(4) PatchAttack throughput (black-box, at most {args.patch_queries} queries per "
        f"image, batch {args.patch_batch}, rl_batch 20, labels = clean predictions)"
    )
    print(f"{'model':<16}{'patch':>7}{'images/s':>10}{'queries/image':>15}{'queries/s':>11}")
    x = data(args.patch_batch, c, side)[0].to(dev)
    ips, queries = patchattack_throughput(net, x, 5, args.patch_queries, args.repeats)
    print(f"{label:<16}{'5x5':>7}{ips:10.1f}{queries:15.1f}{ips * queries:11.0f}")
    results.append(
        {
            "attack": "patchattack",
            "model": label,
            "images_per_s": ips,
            "queries_per_image": queries,
            "query_budget": args.patch_queries,
        }
    )
    return results


if __name__ == "__main__":
    main()

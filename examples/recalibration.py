"""Does re-estimating a trained model's quantizer state hurt it? (the 2-bit check).

Trains the ``dwq-train`` baseline at ``reproduce.py --full``'s size for one seed
(the full-precision model and its patch pool first; the curriculum steps per
epoch), then measures clean accuracy per bit-width four ways on the same weights:

- as trained;
- after ``wrapper.calibrate`` on 256 training images (observers and BatchNorm
  statistics re-estimated);
- with only the BatchNorm statistics re-estimated;
- with only the observers re-estimated.

    python examples/recalibration.py [--seed 0] [--method dwq-train]

About 3 minutes on one CPU core. docs/concepts.md quotes its output.
"""

from __future__ import annotations

import argparse
import copy

import torch

import triqdef
import triqdef.reproduce as R
from triqdef.baselines import make_method
from triqdef.evaluate import clean_accuracy


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--method", default="dwq-train", choices=["multibit", "pbat-shared", "dwq-train", "triqdef"]
    )
    p.add_argument("--size", default="full", choices=list(R.SIZES))
    p.add_argument("--data", default="auto")
    args = p.parse_args(argv)
    size, seed = R.SIZES[args.size], args.seed
    data = R.load_data(args.data, size, seed)
    xtr, ytr, xte, yte = data.x_train, data.y_train, data.x_eval, data.y_eval
    torch.manual_seed(seed)
    fp_model, _ = R.make_model("smallcnn", xtr.shape[1], size["width"])
    fp = make_method("multibit", fp_model, bits=(32,))
    R.train(fp, xtr, ytr, size["epochs"], size["batch"], 3e-3, seed, False)
    pool = R.build_pool(fp.wrapper, xtr, ytr, size, seed)
    torch.manual_seed(seed)
    model, layers = R.make_model("smallcnn", xtr.shape[1], size["width"])
    method = R.build_method(args.method, model, layers, triqdef.DEFAULT_BITS, pool, size, seed)
    R.train(method, xtr, ytr, size["epochs"], size["batch"], 3e-3, seed, False)
    trained = method.wrapper
    bits = [b for b in R.EVAL_BITS if b < 32]
    recal = copy.deepcopy(trained)
    recal.calibrate([xtr[:256]], bits=bits)

    def mixed(keep: str):
        """The recalibrated state, except the entries named ``keep`` taken as trained."""
        w = copy.deepcopy(recal)
        state, old = w.state_dict(), trained.state_dict()
        w.load_state_dict({k: old[k] if keep in k else v for k, v in state.items()})
        return w

    rows = {
        "as trained": trained,
        "calibrate(256 images)": recal,
        "BatchNorm statistics only": mixed("quantizers."),
        "observers only": mixed("bn_stats."),
    }
    out = {}
    print(f"{args.method}, seed {seed}: clean accuracy (%) at " + ", ".join(map(str, bits)))
    for name, w in rows.items():
        # a tiny run may never have visited some bit-widths: n/a where not calibrated
        ready = w.calibrated_bits()
        acc = clean_accuracy(w, [(xte, yte)], bits=[b for b in bits if b in ready])
        out[name] = {b: acc.get(b) for b in bits}
        print(
            f"  {name:<28}"
            + "".join(f"{100 * acc[b]:7.1f}" if b in acc else "    n/a" for b in bits)
        )
    return out


if __name__ == "__main__":
    main()

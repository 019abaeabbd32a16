"""Reproduction: does TriQDef stop adversarial patches from transferring across bit-widths?

The same program as ``triqdef reproduce`` (the code is in ``triqdef/reproduce.py``;
``--help`` lists the options, docs/cli.md describes them):

    python examples/reproduce.py                    # small default size (2 CPU cores)
    python examples/reproduce.py --full --seeds 0   # the real experiment, ~2 h per seed on a core
    python examples/reproduce.py --data cifar10 --model resnet20
    python examples/reproduce.py --attacks all      # adds DPR and the black-box PatchAttack
    python examples/reproduce.py --merge runs/s0/results.json runs/s1/results.json --out runs/all
"""

from __future__ import annotations

from triqdef.reproduce import main

if __name__ == "__main__":
    main()

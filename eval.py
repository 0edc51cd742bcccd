"""The shared evaluator: any defense, any classifier, every threat model, one command.

    python eval.py --classifier checkpoints/victim_shapes.pt --data shapes \\
        --defense jpeg:quality=75 median:kernel=3 bit_depth:bits=4 \\
        --attacks fgsm,pgd20 --threats none,gray-box,white-box,bpda --n 500 --out results/shapes_baselines

Images come from a class-balanced index list drawn from --seed (or read with --indices), stored
as indices.json beside the results with its hash. For each defense, threat model, attack and
epsilon it writes one row; then the per-image worst case over attacks per threat model, the
sanity checks (undefended accuracy at a large epsilon must be ~0; warnings on signs of gradient
masking), and results.json, results.csv, results.md, eps_accuracy.png and examples.png to --out,
which must not hold results already unless --overwrite is given. See evaluation/threats.py for
what each threat model means and attacks/registry.py for the attack names; the options and the
evaluation itself: evaluation/cli.py.
"""

from evaluation.cli import main

if __name__ == "__main__":
    main()

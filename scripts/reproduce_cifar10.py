"""The full-scale CIFAR-10 table in one command; the stages and their sizes: evaluation/reproduce.py.

python scripts/reproduce_cifar10.py            # one GPU, the configs' sizes
python scripts/reproduce_cifar10.py --smoke    # the same stages at toy sizes on the CPU
"""

from evaluation.reproduce import main

if __name__ == "__main__":
    main()

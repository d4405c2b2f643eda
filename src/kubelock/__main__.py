"""``python -m kubelock``: the same as the ``kubelock`` console script."""

from kubelock.cli import main

if __name__ == "__main__":
    main()

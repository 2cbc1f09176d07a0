"""`python -m jaxtx.train CONFIG [key=value ...]`: the same as `jaxtx train`, without the core CLI (tests use it)."""
import argparse
import sys

from jaxtx.train.cli import register_train


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxtx.train")
    sub = parser.add_subparsers(dest="command", required=True)
    register_train(sub)
    args = parser.parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

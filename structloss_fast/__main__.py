"""Command line: `python -m structloss_fast info | bench [options]`."""
import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m structloss_fast {info,bench} [options]\n"
              "  info   versions, and which backends are built and usable here\n"
              "  bench  the benchmark suite (time and peak memory beside the peers); bench --help")
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "info":
        from .info import main as info_main

        return info_main(rest)
    if cmd == "bench":
        from .bench.runner import main as bench_main

        return bench_main(rest)
    print(f"unknown command {cmd!r}; expected info or bench", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

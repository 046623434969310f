"""Madry's released models, as MadryLab/cifar10_challenge's fetch_model.py:
`python -m madry_ns.fetch_model NAME` (in a checkout, also `python fetch_model.py NAME`)
with NAME one of natural, adv_trained, secret.

Downloads NAME.zip from Madry's Dropbox URL into the working directory, prints its SHA-256
and extracts it (models/naturally_trained, models/adv_trained, ...). Offline, it fails with
a message at once; `--from_zip PATH` extracts a zip downloaded elsewhere instead.
"""

import sys

from madry_ns import cli
from madry_ns.errors import UsageError

ARGUMENTS = "[natural, adv_trained, secret] [--from_zip PATH]"


def fetch_model(args):
    from madry_ns import fetch

    if args.name is None and args.from_zip is None:
        raise UsageError("give a model name or --from_zip PATH")
    fetch.fetch(args.name, from_zip=args.from_zip)


def main(argv=None, prog: str = "python -m madry_ns.fetch_model") -> int:
    """Run the command on `argv` (default: sys.argv[1:]); its exit status."""
    from madry_ns import fetch

    parser = cli.Parser(prog, __doc__, fetch_model, config=False,
                        usage=f"{prog} {ARGUMENTS}")
    parser.add_argument("name", nargs="?", choices=sorted(fetch.URLS),
                        help="which model (optional with --from_zip)")
    parser.add_argument("--from_zip", metavar="PATH",
                        help="extract this zip (obtained elsewhere) instead of downloading")
    return cli.run(parser, argv)


if __name__ == "__main__":
    sys.exit(main())

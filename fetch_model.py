"""Madry's released models, as MadryLab/cifar10_challenge's fetch_model.py:
`python fetch_model.py NAME` with NAME one of natural, adv_trained, secret.

Downloads NAME.zip from Madry's Dropbox URL into the working directory, prints its SHA-256
and extracts it (models/naturally_trained, models/adv_trained, ...). Offline, it fails with
a message at once; `--from-zip PATH` extracts a zip downloaded elsewhere instead.
"""

import argparse
import sys

from madry_ns import cli

USAGE = "python fetch_model.py [natural, adv_trained, secret] [--from-zip PATH]"


def main(argv):
    from madry_ns import fetch

    parser = argparse.ArgumentParser(usage=USAGE, description=__doc__.split("\n\n")[0])
    parser.add_argument("name", nargs="?", choices=sorted(fetch.URLS),
                        help="which model (optional with --from-zip)")
    parser.add_argument("--from-zip", metavar="PATH",
                        help="extract this zip (obtained elsewhere) instead of downloading")
    args = parser.parse_args(argv)
    if args.name is None and args.from_zip is None:
        parser.error("give a model name or --from-zip PATH")
    fetch.fetch(args.name, from_zip=args.from_zip)


if __name__ == "__main__":
    cli.report_user_errors(main, sys.argv[1:])

"""Report FID / KID runs: report.json, report.md (one table) and report.png (bar plots side by side).

python eval/report.py stella=runs/stella.json lora=runs/lora.json base=runs/base.json --output_dir reports/
"""

from __future__ import annotations

import argparse

from stella_diffusion.cli import ArgumentParser
from stella_diffusion.evaluation.report import load_runs, write_report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", help="result JSON files of eval/fid.py, optionally as name=path")
    parser.add_argument("--output_dir", required=True, help="folder for report.json, report.md and report.png")
    parser.add_argument("--title", default="FID / KID")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    paths = write_report(load_runs(args.runs), args.output_dir, args.title)
    print(paths["markdown"].read_text(encoding="utf-8"))
    print("Wrote " + ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()

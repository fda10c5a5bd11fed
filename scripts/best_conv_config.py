"""The fastest slab conv configuration in a `tune.py slabconvtiles` log (conv plus input gradient),
printed as bench_conv_config.py arguments (conv.KEY=VALUE ...).

    python scripts/best_conv_config.py tune_slabconvtiles.log"""
import ast
import re
import sys


def best(lines):
    """(change dict, total ms) of the line whose conv and input-gradient times sum least."""
    found = []
    for line in lines:
        m = re.match(r"slab conv tiles (\{.*?\}): conv ([\d.]+) ms .*input_grad ([\d.]+) ms", line)
        if m:
            found.append((ast.literal_eval(m.group(1)), float(m.group(2)) + float(m.group(3))))
    return min(found, key=lambda f: f[1])


if __name__ == "__main__":
    change, _ = best(open(sys.argv[1]))
    print(" ".join(f"conv.{k}={0 if v is None else v}" for k, v in change.items()))

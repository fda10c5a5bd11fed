"""Run the benchmark with another launch configuration of the slab conv kernel, to time a
tile choice on the whole path rather than on one slab (scripts/tune.py slabconv):

    python scripts/bench_conv_config.py BR,BC,num_warps,num_stages,unroll -- BENCH_ARGS

The configuration is recorded in the results only through this script's printout."""
import sys

from mta_kernels import slab_conv


def main():
    spec, rest = sys.argv[1], sys.argv[sys.argv.index("--") + 1:]
    BR, BC, warps, stages, unroll = (int(x) for x in spec.split(","))
    slab_conv.CONV_CONFIG = dict(BR=BR, BC=BC, num_warps=warps, num_stages=stages, unroll=unroll)
    print(f"slab_conv.CONV_CONFIG = {slab_conv.CONV_CONFIG}", flush=True)
    from bench.__main__ import main as bench_main
    bench_main(rest)


if __name__ == "__main__":
    main()

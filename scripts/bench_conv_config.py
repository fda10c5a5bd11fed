"""Run the benchmark with other launch configurations of the slab conv kernels, to time a
choice on the whole path rather than on one slab (scripts/tune.py slabconv):

    python scripts/bench_conv_config.py conv.BR=32 wgrad.BR=32 wgrad.maxnreg=0 strip.TILES=0 wgstrip.on=1 -- BENCH_ARGS

Each conv.KEY=VALUE sets slab_conv.CONV_CONFIG[KEY], strip.KEY=VALUE
slab_conv.STRIP_CONV_CONFIG[KEY], wgrad.KEY=VALUE slab_conv.WEIGHT_GRAD_CONFIG[KEY] and
wgstrip.KEY=VALUE slab_conv.WEIGHT_GRAD_STRIP_CONFIG[KEY] (integers, or "full"; maxnreg=0: no
cap; tma=0: no TMA); the rest stays as committed. The configuration is recorded in the results
only through this script's printout."""
import sys

from mta_kernels import slab_conv


def main():
    split = sys.argv.index("--")
    configs = {"conv": dict(slab_conv.CONV_CONFIG), "strip": dict(slab_conv.STRIP_CONV_CONFIG),
               "wgrad": dict(slab_conv.WEIGHT_GRAD_CONFIG), "wgstrip": dict(slab_conv.WEIGHT_GRAD_STRIP_CONFIG)}
    for setting in sys.argv[1:split]:
        name, value = setting.split("=")
        which, key = name.split(".")
        configs[which][key] = value if value == "full" else int(value)
    slab_conv.CONV_CONFIG, slab_conv.WEIGHT_GRAD_CONFIG = configs["conv"], configs["wgrad"]
    slab_conv.STRIP_CONV_CONFIG, slab_conv.WEIGHT_GRAD_STRIP_CONFIG = configs["strip"], configs["wgstrip"]
    print(f"slab_conv.CONV_CONFIG = {slab_conv.CONV_CONFIG}; STRIP_CONV_CONFIG = {slab_conv.STRIP_CONV_CONFIG}; "
          f"WEIGHT_GRAD_CONFIG = {slab_conv.WEIGHT_GRAD_CONFIG}; "
          f"WEIGHT_GRAD_STRIP_CONFIG = {slab_conv.WEIGHT_GRAD_STRIP_CONFIG}", flush=True)
    from bench.__main__ import main as bench_main
    bench_main(sys.argv[split + 1:])


if __name__ == "__main__":
    main()

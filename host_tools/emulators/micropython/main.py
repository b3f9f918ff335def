# Boot script of a bench board. On an RP2040 MicroPython runs main.py at power-up and the
# board config is board.json next to it; under the Unix port the config path is the first
# argument: `micropython main.py board.json`. Everything else is imported as compiled .mpy.
import bench_app

bench_app.main()

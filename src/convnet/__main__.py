import os
import sys

from convnet.cli.parser import main

code = main()
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    # One of several processes under torchrun, its run written and its process group left: gloo's
    # threads can still hold tensors that the interpreter's teardown would free without the GIL
    # (SIGABRT, "terminate called without an active exception"), so the process leaves at once.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
raise SystemExit(code)

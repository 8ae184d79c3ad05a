from yolo_admm.cli import main

status = main()
# CPython sets a flag when code run from a string (exec or eval of a string, as dataclasses and
# namedtuple use to build their methods) ends with a KeyboardInterrupt, even one caught later. Under
# `python -m`, a set flag makes the interpreter kill itself with SIGINT at exit: a Ctrl-C that main()
# had handled (exit 130) ended so about 3 times in 100 early ones (scripts/interrupt_fuzz.py --early).
# Every string exec clears the flag as it starts: this one, after main(), clears it for good.
exec("pass")
raise SystemExit(status)

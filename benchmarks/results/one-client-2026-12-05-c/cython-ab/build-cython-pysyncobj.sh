#!/bin/bash
# Measurement only, not landed: PySyncObj 0.3.17 compiled to C modules by Cython 3 (no type annotations),
# in a venv of its own, to see whether the interpreter's work in PySyncObj bounds a write at 1 client.
# `replicated` and `replicated_sync` inject methods into the caller's frame (sys._getframe) and copy
# functions through __code__, which compiled functions do not have: they are moved to a module left
# in Python, which syncobj imports back. Run from anywhere; it makes /tmp/cy.
set -euo pipefail
python3 -m venv /tmp/cy
/tmp/cy/bin/pip install -q -e "$(git rev-parse --show-toplevel)[test,bench]" cython
cd /tmp/cy/lib/python3.11/site-packages/pysyncobj
python3 - <<'PY'
src = open('syncobj.py').read()
i = src.index('def __copy_func(f, name):')
head, tail = src[:i], src[i:]
hdr = ('import sys, types, functools, threading\n'
       'from .syncobj import SyncObj, SyncObjConsumer, SyncObjException, is_py3\n'
       'from .syncobj import pickle, _COMMAND_TYPE\n\n')
open('_decorators.py', 'w').write(hdr + tail.replace('__copy_func', '_copy_func'))
open('syncobj.py', 'w').write(head + '\nfrom ._decorators import AsyncResult, replicated, replicated_sync\n')
PY
/tmp/cy/bin/cythonize -i -3 -j 2 syncobj.py tcp_connection.py transport.py poller.py fast_queue.py node.py \
    journal.py pipe_notifier.py tcp_server.py
/tmp/cy/bin/python -c "import pysyncobj.syncobj as s; assert s.__file__.endswith('.so'), s.__file__"

"""A driver for the shared-memory fault tests: ``python shm_driver.py MODE KEY NBYTES``.

Joins the instance named by SHOAL_ADDRESS and calls the ``holder`` app's deployment:
``send``: ``hold(array, KEY)`` (a large argument: a segment this process created);
``receive``: ``produce(KEY, NBYTES)`` (a large result: a segment made for this process);
``own``: starts no call; deploys an echo on a private instance, echoes an array, prints the
segment directory and waits on stdin (the test kills it or closes stdin to stop it).
Prints ``sent`` once the call is on its way, then waits for the test to kill it.
"""

import sys

import numpy as np

from shoal import serve
from shoal.runtime import shm

mode, key, nbytes = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "own":

    @serve.deployment
    class Echo:
        async def __call__(self, x):
            return x

    handle = serve.run(Echo.bind(), name="echo", route_prefix=None)
    array = np.arange(nbytes // 4, dtype=np.float32)
    assert np.array_equal(handle.remote(array).result(timeout_s=30), array)
    print(shm.directory(), flush=True)
    if sys.stdin.read() == "":  # closed: stop in order
        serve.shutdown()
    sys.exit(0)

handle = serve.get_deployment_handle("Holder", app_name="holder")
sending = mode == "send"
response = handle.hold.remote(np.ones(nbytes // 8), key) if sending else handle.produce.remote(key, nbytes)
print("sent", flush=True)
response.result(timeout_s=120)

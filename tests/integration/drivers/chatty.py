"""A driver program for the log rotation test: ``python chatty.py TOKEN LINES``.

Deploys a replica that prints LINES numbered lines carrying TOKEN, then ``last-TOKEN``, when
called; calls it once and exits.
"""

import sys

from shoal import serve


@serve.deployment
class Chatty:
    def __call__(self, token: str, lines: int) -> str:
        for number in range(lines):
            print(f"line-{number:06d}-{token}")
        print(f"last-{token}")
        return "said"


if __name__ == "__main__":
    serve.start(http_options={"port": 0})
    handle = serve.run(Chatty.bind(), name="chatty", route_prefix=None)
    assert handle.remote(sys.argv[1], int(sys.argv[2])).result(timeout_s=20) == "said"

"""A driver program for the output tests: ``python talk.py TOKEN``.

Deploys a replica that prints and logs lines carrying TOKEN when called, calls it once and exits.
"""

import logging
import sys

from shoal import serve


@serve.deployment
class Talker:
    def __call__(self, token: str) -> str:
        print(f"print-{token}")
        logging.getLogger("user.app").warning("logging-%s", token)
        print(f"stderr-{token}", file=sys.stderr)
        return "said"


if __name__ == "__main__":
    serve.start(http_options={"port": 0})
    handle = serve.run(Talker.bind(), name="talk", route_prefix=None)
    assert handle.remote(sys.argv[1]).result(timeout_s=10) == "said"

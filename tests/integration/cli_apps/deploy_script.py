"""A user's script: ``serve.run`` into the running default instance (``shoal start``), then print
one JSON line with the app's URL and exit; the app stays deployed."""

import json

from greet_app import Greeter

from shoal import serve

if __name__ == "__main__":
    serve.run(Greeter.bind("-scripted"), name="scripted", route_prefix="/scripted")
    print(json.dumps({"url": serve.get_http_url()}), flush=True)

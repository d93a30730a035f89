"""Remote mode: an Open Inference Protocol (KServe v2) REST server and client.

    bulkinfer serve --model minilm --port 8000                  # the server (see `serve`)
    p | bulkinfer.BulkInference(model, server="http://127.0.0.1:8000")   # a job that uses it

`import bulkinfer` does not import this package; it loads only when a server or client is used.
"""

from bulkinfer.serve.remote_model import LoadedRemoteModel, RemoteModel, RetryPolicy
from bulkinfer.serve.server import ServeConfig, Server, serve, start
from bulkinfer.serve.v2_client import RemoteError, V2Client

__all__ = ["LoadedRemoteModel", "RemoteError", "RemoteModel", "RetryPolicy", "ServeConfig", "Server", "V2Client",
           "serve", "start"]

"""The web app around `cogvideox`: what `app.py` (the layout and `main`) is built from.

    launch      command line and environment, passwords, the hardened `launch()` options
    serve       start-up: the pipelines, the prompt enhancer, the server, the log's first lines
    request     a Generate click as one checked, frozen Request, built once and passed whole to the job
    validation  the limits of a request and the checks behind them
    events      the page's event handlers (PageEvents)
    jobs        render jobs: queue, progress, previews, cancel; ZeroGPU's GPU function
    clips       a clip's files, the gallery kept in the browser
    uploads     a visitor's video or image: checked, read once, deleted after UPLOAD_TTL_S
    pool        --devices: a pipeline per GPU, a job on each
    ranks       --parallel under torchrun: rank 0 serves, every rank denoises
    guard       the HTTP guard: allowed routes, upload and body caps, other sites, proxies, login throttle
    fairness    a fair share of the queue and of server memory per visitor

On a Hugging Face ZeroGPU Space (SPACES_ZERO_GPU set), `spaces` patches torch as it is imported, so it must be
imported before torch is: here, the one place that checks, since every module of this package imports it first.
"""

import os

ZERO_GPU = os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true")  # as spaces reads it
if ZERO_GPU:
    import spaces  # noqa: F401

"""``hftlab serve``: the fine-tuning-as-a-service provider's gate as an HTTP service.

Tenants upload fine-tuning data, pick a task and a defense from the provider's allow-list and
start a job; a worker process screens, fine-tunes and evaluates through the ordinary pipeline,
then the gate (:mod:`hftlab.serve.gate`) deploys the adapter only if the harmful score did not
rise more than the provider allows. Modules: :mod:`.config` (the service config), :mod:`.store`
(SQLite or Postgres: tenants, uploads, jobs, the queue), :mod:`.auth` (API keys),
:mod:`.uploads` (parsing, limits, screening), :mod:`.runner` (one job through the pipeline),
:mod:`.worker` (the claim/heartbeat loop), :mod:`.gate`, :mod:`.app` (FastAPI), :mod:`.cli`."""

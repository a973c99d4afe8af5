"""The training run only, plain Python + torch, no Prefect: the loop, its data and epoch sampler, noise,
loss, optimizer, EMA, backups, several processes and metrics. Imports the core (`likeness`,
`likeness.models`), never `likeness.tasks` or Prefect, so `accelerate launch -m likeness.trainer.loop` works."""

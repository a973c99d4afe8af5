"""Plain Python + torch, no Prefect imports: settings, models, data, loss, optimizer, loop, sampling, export."""

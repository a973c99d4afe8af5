"""How the likeness flows are served: entry flows (profile or settings form), the deployment table,
`likeness serve`, `likeness server` and prefect.yaml for work pools. See docs/operations.md."""

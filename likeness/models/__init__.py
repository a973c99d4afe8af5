"""Model loading, conditioning, sampling, embeddings and checkpoint export: what training, evaluation and the stages share."""

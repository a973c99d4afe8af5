"""likeness: photos of a person in, the best fine-tuned SDXL checkpoint out."""

"""Ready-made profiles (TOML), shipped with the package so `--profile NAME` works from anywhere."""

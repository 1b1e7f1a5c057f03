"""The project's own model zoo: plain nn.Modules with Hugging Face-compatible module names."""

"""Written explanations of (neuron, head) pairs and their scores: keyword baseline, OpenAI-compatible
endpoints, local Hugging Face chat models."""

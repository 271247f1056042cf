"""Written explanations of (neuron, head) pairs and their scores: the offline statistical explainer
(sparse logistic regression over n-grams), OpenAI-compatible endpoints, local Hugging Face chat models."""

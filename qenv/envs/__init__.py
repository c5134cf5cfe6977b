"""The Gymnasium environment and its parts (action spaces, features, rewards)."""

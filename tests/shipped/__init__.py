"""What ships beside the code and must agree with it: the deploy manifests and the README's commands."""

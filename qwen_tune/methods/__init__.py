"""The training methods, peers that share components and never import each other."""

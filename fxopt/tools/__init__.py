"""The command line and the things around it: pictures, the digits model, recipes, latency."""

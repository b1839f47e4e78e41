"""Tables and plots from stored scores. Knows nothing about models: never reruns one."""

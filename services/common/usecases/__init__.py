"""Templates a service's handlers are written with: the resource use case and the events writer."""

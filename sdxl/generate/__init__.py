"""Dataset generation: prompt lists, generation runs, and writers for the output layouts."""

"""Lightning modules and callbacks that compose the parts for training; they stay thin."""

//! Model configurations: SD-1.5 and the tiny test model.

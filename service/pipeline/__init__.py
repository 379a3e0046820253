"""The stages of the loop, from consumed record to committed offset."""

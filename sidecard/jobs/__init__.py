"""Async jobs: submit now, get the answer later, through a Message Batch at half the price when it can wait."""

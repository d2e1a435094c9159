"""The dropout lab: train one recurrent classifier with each dropout placement over several seeds and report the results."""

"""Registration metrics (Dice, HD95, TRE, NDV, Jacobians), the LUMIR evaluator, QC figures and the evaluator's metric handler."""

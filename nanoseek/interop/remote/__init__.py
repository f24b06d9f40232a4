"""nanoseek's modelling code for transformers (``trust_remote_code=True``), copied beside the weights by
``nanoseek export`` for models no stock class computes (HC / mHC residuals, ReLU², ...). The two modules import only
torch and transformers, so an exported folder works where nanoseek is not installed; nanoseek never imports them."""

"""llm2vec's MTEB task instructions, and the sentence-transformers ``prompts`` built from them.

The 67 texts are data from McGill-NLP/llm2vec (``test_configs/mteb/task_to_instructions.json``, MIT licence,
Copyright (c) 2024 McGill NLP), keyed by mteb task name. llm2vec gives the instruction to queries only in
retrieval and reranking tasks (documents are encoded plain) and to both sides elsewhere. mteb's English variants
of those tasks (``LLM2VEC_TASK_VARIANTS``) get their base task's instruction.

:func:`mteb_prompts` turns the table into prompts keyed as mteb 2.x looks them up from a model's ``prompts``
(``mteb.models.abs_encoder.get_prompt_name``: ``"{task}-{query|document}"``, then ``"{task}"``, then
``"{task type}-{side}"``, ``"{task type}"``, then ``"query"`` / ``"document"``). The same dict is written into an
export's ``config_sentence_transformers.json`` and used by ``engine.mteb_model.EngineMTEBModel``, so both paths
give every task the same prompt. No mteb import here: the export does not need mteb.
"""
from .encoding import instruction_prefix

# task name -> (mteb task type, instruction)
LLM2VEC_TASKS = {
    'ClimateFEVER': ('Retrieval', 'Given a claim about climate change, retrieve documents that support or refute the claim:'),
    'HotpotQA': ('Retrieval', 'Given a multi-hop question, retrieve documents that can help answer the question:'),
    'FEVER': ('Retrieval', 'Given a claim, retrieve documents that support or refute the claim:'),
    'MSMARCO': ('Retrieval', 'Given a web search query, retrieve relevant passages that answer the query:'),
    'DBPedia': ('Retrieval', 'Given a query, retrieve relevant entity descriptions from DBPedia:'),
    'NQ': ('Retrieval', 'Given a question, retrieve Wikipedia passages that answer the question:'),
    'QuoraRetrieval': ('Retrieval', 'Given a question, retrieve questions that are semantically equivalent to the given question:'),
    'SCIDOCS': ('Retrieval', 'Given a scientific paper title, retrieve paper abstracts that are cited by the given paper:'),
    'TRECCOVID': ('Retrieval', 'Given a query on COVID-19, retrieve documents that answer the query:'),
    'Touche2020': ('Retrieval', 'Given a question, retrieve detailed and persuasive arguments that answer the question:'),
    'SciFact': ('Retrieval', 'Given a scientific claim, retrieve documents that support or refute the claim:'),
    'NFCorpus': ('Retrieval', 'Given a question, retrieve relevant documents that best answer the question:'),
    'ArguAna': ('Retrieval', 'Given a claim, find documents that refute the claim:'),
    'CQADupstackTexRetrieval': ('Retrieval', 'Given a question, retrieve detailed question descriptions from Stackexchange that are duplicates to the given question:'),
    'CQADupstackWebmastersRetrieval': ('Retrieval', 'Given a question, retrieve detailed question descriptions from Stackexchange that are duplicates to the given question:'),
    'CQADupstackEnglishRetrieval': ('Retrieval', 'Given a question, retrieve detailed question descriptions from Stackexchange that are duplicates to the given question:'),
    'CQADupstackGamingRetrieval': ('Retrieval', 'Given a question, retrieve detailed question descriptions from Stackexchange that are duplicates to the given question:'),
    'CQADupstackGisRetrieval': ('Retrieval', 'Given a question, retrieve detailed question descriptions from Stackexchange that are duplicates to the given question:'),
    'CQADupstackUnixRetrieval': ('Retrieval', 'Given a question, retrieve detailed question descriptions from Stackexchange that are duplicates to the given question:'),
    'CQADupstackMathematicaRetrieval': ('Retrieval', 'Given a question, retrieve detailed question descriptions from Stackexchange that are duplicates to the given question:'),
    'CQADupstackStatsRetrieval': ('Retrieval', 'Given a question, retrieve detailed question descriptions from Stackexchange that are duplicates to the given question:'),
    'CQADupstackPhysicsRetrieval': ('Retrieval', 'Given a question, retrieve detailed question descriptions from Stackexchange that are duplicates to the given question:'),
    'CQADupstackProgrammersRetrieval': ('Retrieval', 'Given a question, retrieve detailed question descriptions from Stackexchange that are duplicates to the given question:'),
    'CQADupstackAndroidRetrieval': ('Retrieval', 'Given a question, retrieve detailed question descriptions from Stackexchange that are duplicates to the given question:'),
    'CQADupstackWordpressRetrieval': ('Retrieval', 'Given a question, retrieve detailed question descriptions from Stackexchange that are duplicates to the given question:'),
    'FiQA2018': ('Retrieval', 'Given a financial question, retrieve user replies that best answer the question:'),
    'AskUbuntuDupQuestions': ('Reranking', 'Retrieve duplicate questions from AskUbuntu forum:'),
    'StackOverflowDupQuestions': ('Reranking', 'Retrieve duplicate questions from StackOverflow forum:'),
    'SciDocsRR': ('Reranking', 'Given a title of a scientific paper, retrieve the titles of other relevant papers:'),
    'MindSmallReranking': ('Reranking', 'Retrieve relevant news articles based on user browsing history:'),
    'Banking77Classification': ('Classification', 'Given a online banking query, find the corresponding intents:'),
    'EmotionClassification': ('Classification', 'Classify the emotion expressed in the given Twitter message into one of the six emotions: anger, fear, joy, love, sadness, and surprise:'),
    'TweetSentimentExtractionClassification': ('Classification', 'Classify the sentiment of a given tweet as either positive, negative, or neutral:'),
    'AmazonCounterfactualClassification': ('Classification', 'Classify a given Amazon customer review text as either counterfactual or notcounterfactual:'),
    'ImdbClassification': ('Classification', 'Classify the sentiment expressed in the given movie review text from the IMDB dataset:'),
    'MassiveIntentClassification': ('Classification', 'Given a user utterance as query, find the user intents:'),
    'MassiveScenarioClassification': ('Classification', 'Given a user utterance as query, find the user scenarios:'),
    'MTOPDomainClassification': ('Classification', 'Classify the intent domain of the given utterance in task-oriented conversation:'),
    'MTOPIntentClassification': ('Classification', 'Classify the intent of the given utterance in task-oriented conversation:'),
    'ToxicConversationsClassification': ('Classification', 'Classify the given comments as either toxic or not toxic:'),
    'AmazonPolarityClassification': ('Classification', 'Classify Amazon reviews into positive or negative sentiment:'),
    'AmazonReviewsClassification': ('Classification', 'Classify the given Amazon review into its appropriate rating category:'),
    'TwentyNewsgroupsClustering': ('Clustering', 'Identify the topic or theme of the given news articles:'),
    'BiorxivClusteringS2S': ('Clustering', 'Identify the main category of Biorxiv papers based on the titles:'),
    'MedrxivClusteringS2S': ('Clustering', 'Identify the main category of Medrxiv papers based on the titles:'),
    'ArxivClusteringP2P': ('Clustering', 'Identify the main and secondary category of Arxiv papers based on the titles and abstracts:'),
    'ArxivClusteringS2S': ('Clustering', 'Identify the main and secondary category of Arxiv papers based on the titles:'),
    'BiorxivClusteringP2P': ('Clustering', 'Identify the main category of Biorxiv papers based on the titles and abstracts:'),
    'MedrxivClusteringP2P': ('Clustering', 'Identify the main category of Medrxiv papers based on the titles and abstracts:'),
    'RedditClustering': ('Clustering', 'Identify the topic or theme of Reddit posts based on the titles:'),
    'RedditClusteringP2P': ('Clustering', 'Identify the topic or theme of Reddit posts based on the titles and posts:'),
    'StackExchangeClustering': ('Clustering', 'Identify the topic or theme of StackExchange posts based on the titles:'),
    'StackExchangeClusteringP2P': ('Clustering', 'Identify the topic or theme of StackExchange posts based on the given paragraphs:'),
    'TwitterSemEval2015': ('PairClassification', 'Retrieve tweets that are semantically similar to the given tweet:'),
    'TwitterURLCorpus': ('PairClassification', 'Retrieve tweets that are semantically similar to the given tweet:'),
    'SprintDuplicateQuestions': ('PairClassification', 'Retrieve duplicate questions from Sprint forum:'),
    'STS12': ('STS', 'Retrieve semantically similar text:'),
    'STS13': ('STS', 'Retrieve semantically similar text:'),
    'STS14': ('STS', 'Retrieve semantically similar text:'),
    'STS15': ('STS', 'Retrieve semantically similar text:'),
    'STS16': ('STS', 'Retrieve semantically similar text:'),
    'STS17': ('STS', 'Retrieve semantically similar text:'),
    'STS22': ('STS', 'Retrieve semantically similar text:'),
    'BIOSSES': ('STS', 'Retrieve semantically similar text:'),
    'SICK-R': ('STS', 'Retrieve semantically similar text:'),
    'STSBenchmark': ('STS', 'Retrieve semantically similar text:'),
    'SummEval': ('Summarization', 'Given a news summary, retrieve other semantically similar summaries:'),
}
# mteb's English variants of those tasks (versions, hard-negative, decontaminated and Nano subsets), each with
# the task it is adapted from: its metadata's ``adapted_from``, restricted to English-only tasks of the same type,
# read from mteb 2.26.24. A variant gets its base task's instruction (MTEB(eng, v2) holds several: without it,
# FEVERHardNegatives' queries were encoded with no instruction at all).
LLM2VEC_TASK_VARIANTS = {
    'AmazonPolarityClassification.v2': 'AmazonPolarityClassification', 'ArguAnaDecontaminated': 'ArguAna',
    'ArxivClusteringP2P.v2': 'ArxivClusteringP2P', 'Banking77Classification.v2': 'Banking77Classification',
    'BiorxivClusteringP2P.v2': 'BiorxivClusteringP2P', 'BiorxivClusteringS2S.v2': 'BiorxivClusteringS2S',
    'ClimateFEVER.v2': 'ClimateFEVER', 'ClimateFEVERHardNegatives': 'ClimateFEVER',
    'ClimateFEVERHardNegatives.v2': 'ClimateFEVER', 'DBPediaHardNegatives': 'DBPedia',
    'DBPediaHardNegatives.v2': 'DBPedia', 'EmotionClassification.v2': 'EmotionClassification',
    'FEVERHardNegatives': 'FEVER', 'FEVERHardNegatives.v2': 'FEVER', 'FiQADecontaminated': 'FiQA2018',
    'HUMEArxivClusteringP2P': 'ArxivClusteringP2P', 'HUMEEmotionClassification': 'EmotionClassification',
    'HUMERedditClusteringP2P': 'RedditClusteringP2P', 'HUMESICK-R': 'SICK-R', 'HUMESTS12': 'STS12',
    'HUMESTSBenchmark': 'STSBenchmark', 'HUMEToxicConversationsClassification': 'ToxicConversationsClassification',
    'HUMETweetSentimentExtractionClassification': 'TweetSentimentExtractionClassification',
    'HotpotQAHardNegatives': 'HotpotQA', 'HotpotQAHardNegatives.v2': 'HotpotQA',
    'ImdbClassification.v2': 'ImdbClassification', 'MSMARCOHardNegatives': 'MSMARCO', 'MSMARCOv2': 'MSMARCO',
    'MedrxivClusteringP2P.v2': 'MedrxivClusteringP2P', 'MedrxivClusteringS2S.v2': 'MedrxivClusteringS2S',
    'NFCorpusDecontaminated': 'NFCorpus', 'NQHardNegatives': 'NQ', 'NQTablesRetrieval': 'NQ',
    'NanoArguAnaRetrieval': 'ArguAna', 'NanoClimateFeverRetrieval': 'ClimateFEVER', 'NanoDBPediaRetrieval': 'DBPedia',
    'NanoFEVERRetrieval': 'FEVER', 'NanoFiQA2018Retrieval': 'FiQA2018', 'NanoHotpotQARetrieval': 'HotpotQA',
    'NanoMSMARCORetrieval': 'MSMARCO', 'NanoNFCorpusRetrieval': 'NFCorpus', 'NanoNQRetrieval': 'NQ',
    'NanoQuoraRetrieval': 'QuoraRetrieval', 'NanoSCIDOCSRetrieval': 'SCIDOCS', 'NanoSciFactRetrieval': 'SciFact',
    'NanoTouche2020Retrieval': 'Touche2020', 'QuoraRetrievalDecontaminated': 'QuoraRetrieval',
    'QuoraRetrievalHardNegatives': 'QuoraRetrieval', 'QuoraRetrievalHardNegatives.v2': 'QuoraRetrieval',
    'RedditClustering.v2': 'RedditClustering', 'RedditClusteringP2P.v2': 'RedditClusteringP2P',
    'STSBenchmark.v2': 'STSBenchmark', 'SciDocsDecontaminated': 'SCIDOCS', 'SciFactDecontaminated': 'SciFact',
    'StackExchangeClustering.v2': 'StackExchangeClustering',
    'StackExchangeClusteringP2P.v2': 'StackExchangeClusteringP2P', 'SummEvalSummarization.v2': 'SummEval',
    'Touche2020Decontaminated': 'Touche2020', 'Touche2020Retrieval.v3': 'Touche2020',
    'ToxicConversationsClassification.v2': 'ToxicConversationsClassification', 'TrecCOVIDDecontaminated': 'TRECCOVID',
    'TweetSentimentExtractionClassification.v2': 'TweetSentimentExtractionClassification',
    'TwentyNewsgroupsClustering.v2': 'TwentyNewsgroupsClustering',
}
ASYMMETRIC_TYPES = ("Retrieval", "Reranking")  # instruction on the query side only
# mteb task types whose llm2vec instruction is the same for every task of the type: a task of that type that the
# table does not name (a local copy such as STSBenchmarkLocal) gets it through the "{type}" key.
SHARED_TYPE_INSTRUCTIONS = {"STS": "Retrieve semantically similar text:"}


def mteb_prompts(default_instruction="", table=None):
    """sentence-transformers ``prompts`` (name -> prompt text, the separator included: each ends in the newline
    of :func:`engine.encoding.instruction_prefix`, so sentence-transformers' ``prompt + text`` is the engine's
    string). ``table`` (task name -> instruction, "" for none) overrides / extends llm2vec's; the model's own
    ``default_instruction`` becomes the ``query`` prompt, "" the ``document`` one."""
    prompts = {}
    entries = {name: (ttype, instr) for name, (ttype, instr) in LLM2VEC_TASKS.items()}
    entries.update({name: LLM2VEC_TASKS[base] for name, base in LLM2VEC_TASK_VARIANTS.items()})
    for name, instr in (table or {}).items():
        entries[name] = (entries.get(name, (None, ""))[0], instr)
    for name, (ttype, instr) in entries.items():
        if ttype in ASYMMETRIC_TYPES:
            prompts[f"{name}-query"] = instruction_prefix(instr)
            prompts[f"{name}-document"] = ""
        else:
            prompts[name] = instruction_prefix(instr)
    for ttype, instr in SHARED_TYPE_INSTRUCTIONS.items():
        prompts[ttype] = instruction_prefix(instr)
    if default_instruction:
        prompts["query"] = instruction_prefix(default_instruction)
        prompts["document"] = ""
    return prompts


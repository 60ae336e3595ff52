"""The TinySQL vocabulary: table and field names, their English synonyms, column types and English phrasing.

Written for this project. Names are lower-case snake_case as they appear in SQL; each has two one-word English
synonyms, unique across the whole vocabulary, so that an Instruction that says "cost" can only mean "price"
and the model has to look the spelling up in the Context. Every name and synonym is a single token (with its
leading space) in the embedded tokenizer; for other tokenizers the pair generator filters out words that are
not.
"""
from __future__ import annotations

TABLES: dict[str, tuple[str, str]] = {
    "customers": ("clients", "buyers"),
    "orders": ("purchases", "requests"),
    "products": ("goods", "merchandise"),
    "employees": ("staff", "workers"),
    "invoices": ("bills", "statements"),
    "payments": ("remittances", "settlements"),
    "suppliers": ("vendors", "providers"),
    "shipments": ("deliveries", "consignments"),
    "reviews": ("ratings", "critiques"),
    "accounts": ("profiles", "logins"),
    "projects": ("initiatives", "ventures"),
    "tasks": ("chores", "assignments"),
    "events": ("happenings", "occasions"),
    "tickets": ("passes", "vouchers"),
    "books": ("volumes", "novels"),
    "authors": ("writers", "novelists"),
    "students": ("pupils", "learners"),
    "courses": ("classes", "lectures"),
    "teachers": ("instructors", "tutors"),
    "patients": ("sufferers", "invalids"),
    "doctors": ("physicians", "medics"),
    "vehicles": ("cars", "automobiles"),
    "drivers": ("chauffeurs", "motorists"),
    "flights": ("journeys", "voyages"),
    "hotels": ("inns", "lodges"),
    "rooms": ("chambers", "suites"),
    "songs": ("tracks", "tunes"),
    "albums": ("records", "releases"),
    "movies": ("films", "pictures"),
    "games": ("matches", "contests"),
    "players": ("athletes", "competitors"),
    "teams": ("squads", "crews"),
    "stores": ("shops", "outlets"),
    "warehouses": ("depots", "storehouses"),
    "messages": ("texts", "letters"),
    "comments": ("remarks", "replies"),
    "departments": ("divisions", "units"),
    "branches": ("offices", "locations"),
    "recipes": ("dishes", "meals"),
    "sensors": ("detectors", "probes"),
    "order_items": ("lineitems", "entries"),
    "user_sessions": ("visits", "sittings"),
}

FIELDS: dict[str, tuple[str, str]] = {
    "id": ("identifier", "key"),
    "name": ("label", "designation"),
    "price": ("cost", "charge"),
    "quantity": ("amount", "volume"),
    "email": ("mail", "inbox"),
    "phone": ("telephone", "mobile"),
    "address": ("residence", "street"),
    "city": ("town", "municipality"),
    "country": ("nation", "land"),
    "age": ("years", "maturity"),
    "salary": ("wage", "pay"),
    "rating": ("stars", "grade"),
    "status": ("state", "condition"),
    "category": ("kind", "type"),
    "description": ("summary", "details"),
    "weight": ("heaviness", "mass"),
    "height": ("tallness", "elevation"),
    "width": ("breadth", "span"),
    "color": ("colour", "hue"),
    "size": ("dimension", "magnitude"),
    "score": ("points", "tally"),
    "level": ("tier", "rank"),
    "duration": ("length", "timespan"),
    "balance": ("funds", "remainder"),
    "discount": ("rebate", "reduction"),
    "tax": ("levy", "duty"),
    "total": ("overall", "subtotal"),
    "stock": ("inventory", "supply"),
    "brand": ("make", "marque"),
    "model": ("version", "variant"),
    "year": ("vintage", "season"),
    "language": ("tongue", "dialect"),
    "genre": ("style", "form"),
    "author": ("writer", "penman"),
    "title": ("heading", "caption"),
    "content": ("body", "wording"),
    "views": ("impressions", "hits"),
    "likes": ("upvotes", "approvals"),
    "capacity": ("room", "limit"),
    "distance": ("range", "extent"),
    "speed": ("velocity", "pace"),
    "temperature": ("heat", "warmth"),
    "latitude": ("lat", "parallel"),
    "longitude": ("lon", "meridian"),
    "gender": ("sex", "gendertype"),
    "username": ("handle", "nickname"),
    "password": ("passcode", "secret"),
    "token": ("credential", "keycode"),
    "notes": ("annotations", "memos"),
    "priority": ("urgency", "importance"),
    "progress": ("advancement", "headway"),
    "revenue": ("income", "earnings"),
    "profit": ("gain", "margin"),
    "budget": ("allowance", "allocation"),
    "created_at": ("creation", "inception"),
    "updated_at": ("modification", "revision"),
    "due_date": ("deadline", "due"),
    "start_date": ("beginning", "commencement"),
    "end_date": ("finish", "conclusion"),
    "birth_date": ("birthday", "nativity"),
    "user_id": ("user", "member"),
    "order_id": ("orderref", "ordernumber"),
    "product_id": ("product", "item"),
    "first_name": ("forename", "given"),
    "last_name": ("surname", "family"),
    "zip_code": ("postcode", "zip"),
    "is_active": ("active", "enabled"),
    "is_verified": ("verified", "confirmed"),
    "ip_address": ("ip", "netaddress"),
    "file_size": ("filesize", "bytes"),
}

# Words that are never a table or field name, for corruption with novel names (upstream's choice of words).
# Training data with ``GeneratorConfig.filler_p`` > 0 uses them in English filler (FILLER_TEMPLATES), never as a
# name and never in the SQL, so a model knows them as words and use_novel_names asks whether it copies a name
# it has never seen as a name.
NOVEL_TABLES: tuple[str, ...] = ("star", "very", "apple", "blue", "orange")
NOVEL_FIELDS: tuple[str, ...] = ("hammer", "little", "wolf", "sky", "yellow")
# The stricter case: single tokens of the embedded tokenizer that occur nowhere in any training text (their
# embeddings are untrained). make_pairs(..., novel_words="held_out") corrupts with these.
HELD_OUT_NOVEL_TABLES: tuple[str, ...] = ("hand", "head", "song", "play", "shop")
HELD_OUT_NOVEL_FIELDS: tuple[str, ...] = ("low", "buy", "learn", "begin", "set")

# English filler appended to some training Instructions (GeneratorConfig.filler_p): [w] is a novel word.
FILLER_TEMPLATES: tuple[str, ...] = (
    "the code word is [w]", "i am thinking of [w]", "my favourite word is [w]", "note: [w]",
    "it is [w] today", "say [w] when done", "the theme is [w]", "tag it [w]",
)

# Nonce names (GeneratorConfig.nonce_name_p): single tokens of the embedded tokenizer that no other training
# text contains, mostly BPE fragments (" accou", " albu"). Spelling schema names with them teaches the models to
# copy whatever token the CREATE TABLE holds, not only names they have learnt; the novel and held-out words
# are not among them.
NONCE_NAMES: tuple[str, ...] = (
    "accou", "adv", "albu", "ann", "annotation", "ath", "auth", "autom", "aver", "bil", "birth", "bod", "boo",
    "bran", "bre", "cap", "chau", "chauffeur", "cla", "cli", "col", "com", "commence", "comp", "con", "concl",
    "condi", "confir", "cons", "contes", "cour", "cre", "credenti", "cri", "cust", "dat", "dead", "deli", "dep",
    "des", "detail", "dialec", "dim", "dis", "displ", "divis", "doc", "dri", "earn", "emp", "ena", "ent", "ever",
    "exte", "fam", "fet", "fil", "file", "files", "finis", "fligh", "forena", "fro", "fund", "gam", "genderty",
    "goo", "gra", "ham", "hap", "heav", "hote", "identi", "imp", "inbo", "ince", "inco", "initi", "inv", "jour",
    "labe", "lan", "larg", "lec", "let", "leve", "line", "litt", "location", "lod", "login", "loo", "mag",
    "marg", "matu", "medic", "mem", "mer", "merchand", "modi", "mot", "mun", "nativ", "net", "nic", "nove", "occ",
    "over", "par", "paralle", "pass", "phys", "physician", "pic", "pri", "pro", "produc", "prof", "projec",
    "provid", "pupil", "pur", "ran", "rec", "reduc", "rele", "rem", "remaind", "remitt", "repl", "reques", "res",
    "ret", "rev", "sec", "sens", "sit", "small", "squ", "stor", "store", "stud", "suff", "suppl", "sur", "tall",
    "teach", "ticke", "timesp", "tong", "trac", "tun", "urgen", "varian", "vehic", "veloc", "vent", "ver", "vol",
    "ware", "wri",
)

# Column types, by the aggregates they admit (CS3). The base type decides, not the full string.
NUMERIC_TYPES = ("INTEGER", "BIGINT", "SMALLINT", "DECIMAL(10,2)", "FLOAT", "NUMERIC")
TEXT_TYPES = ("TEXT", "VARCHAR(255)", "VARCHAR(50)", "CHAR(10)")
DATE_TYPES = ("DATE", "TIMESTAMP", "DATETIME")
OTHER_TYPES = ("BOOLEAN", "JSON", "BLOB")
ALL_TYPES = NUMERIC_TYPES + TEXT_TYPES + DATE_TYPES + OTHER_TYPES

AGGREGATES_BY_TYPE_CLASS: dict[str, tuple[str, ...]] = {
    "numeric": ("SUM", "AVG", "MIN", "MAX", "COUNT"),
    "text": ("MIN", "MAX", "COUNT"),
    "date": ("MIN", "MAX", "COUNT"),
    "other": ("COUNT",),
}


# Upstream's patching types (helpers.tinysql.word_sets.UPSTREAM), by the class their meaning gives them.
OTHER_TYPE_CLASSES = {"INT": "numeric", "CHAR": "text", "TIME": "date"}


def type_class(sql_type: str) -> str:
    if sql_type in NUMERIC_TYPES:
        return "numeric"
    if sql_type in TEXT_TYPES:
        return "text"
    if sql_type in DATE_TYPES:
        return "date"
    return OTHER_TYPE_CLASSES.get(sql_type, "other")


def allowed_aggregates(sql_type: str) -> tuple[str, ...]:
    """The aggregates a column of this type admits (CS3)."""
    return AGGREGATES_BY_TYPE_CLASS[type_class(sql_type)]


# English select templates: [fields] is "a, b and c", [table] is the table's English word.
SELECT_TEMPLATES: tuple[str, ...] = (
    "show me the [fields] from the [table] table",
    "show [fields] from [table]",
    "list the [fields] of all [table]",
    "get [fields] from [table]",
    "what are the [fields] in [table]",
    "give me the [fields] of the [table]",
    "from [table], get me the [fields]",
    "find the [fields] in the [table] table",
    "display [fields] for every entry in [table]",
    "i need the [fields] from [table]",
    "return the [fields] of each of the [table]",
    "retrieve [fields] from the [table] records",
    "fetch the [fields] stored in [table]",
    "look up [fields] in [table]",
    "pull the [fields] out of [table]",
    "read [fields] from the [table] data",
)

# Sort phrases name the direction with an unmistakable word (a probe found tiny models confuse subtler ones).
ORDER_TEMPLATES: dict[str, tuple[str, ...]] = {
    "ASC": (
        "sorted by [field] ascending",
        "ordered by [field] in ascending order",
        "sorted by [field] from lowest to highest",
        "ordered by [field] ascending",
        "with the smallest [field] first",
    ),
    "DESC": (
        "sorted by [field] descending",
        "ordered by [field] in descending order",
        "sorted by [field] from highest to lowest",
        "ordered by [field] descending",
        "with the largest [field] first",
    ),
}

AGGREGATE_TEMPLATES: dict[str, tuple[str, ...]] = {
    "SUM": ("total [field]", "sum of [field]"),
    "AVG": ("average [field]", "mean [field]"),
    "MIN": ("minimum [field]", "lowest [field]"),
    "MAX": ("maximum [field]", "highest [field]"),
    "COUNT": ("number of [field]", "count of [field]"),
}

def _template_words() -> frozenset[str]:
    texts = SELECT_TEMPLATES + tuple(t for ts in ORDER_TEMPLATES.values() for t in ts)
    texts += tuple(t for ts in AGGREGATE_TEMPLATES.values() for t in ts)
    return frozenset(w for t in texts for w in t.replace(",", " ").split() if not w.startswith("["))


# Words the English templates use themselves; a name that is also one of them is mentioned twice.
TEMPLATE_WORDS: frozenset[str] = _template_words()

SQL_KEYWORDS: tuple[str, ...] = (
    "SELECT", "FROM", "ORDER", "BY", "ASC", "DESC", "AS", "CREATE", "TABLE", "SUM", "AVG", "MIN", "MAX", "COUNT",
)


def _check_vocabulary() -> None:
    """Synonyms must name exactly one thing, and never be a name themselves (else the task is ambiguous)."""
    names = set(TABLES) | set(FIELDS)
    synonyms = [s for syns in list(TABLES.values()) + list(FIELDS.values()) for s in syns]
    duplicated = {s for s in synonyms if synonyms.count(s) > 1}
    clashes = names & set(synonyms)
    if duplicated or clashes:
        raise AssertionError(f"ambiguous vocabulary: duplicated synonyms {duplicated}, synonyms that are names {clashes}")
    novel = set(NOVEL_TABLES + NOVEL_FIELDS + HELD_OUT_NOVEL_TABLES + HELD_OUT_NOVEL_FIELDS)
    taken = (names | set(synonyms) | novel | TEMPLATE_WORDS) & set(NONCE_NAMES)
    if taken or novel & (names | set(synonyms)):
        raise AssertionError(f"nonce or novel words that have another role: {sorted(taken | (novel & names))}")


_check_vocabulary()

"""Corpus diversity statistics and the mode-collapse warning.

Synthetic corpora tend to collapse onto a few invented names or phrasings (one name can
end up in a large share of all documents). We measure distinct-n (unique n-grams / all
n-grams across the corpus), the most frequent invented names and the documents per type
and fact, and warn when one name appears in more than ``max_entity_share`` of the
documents or distinct-2 falls below ``min_distinct2``.

An invented name is a run of capitalised words that does not start a sentence, after its
leading titles, function words, nationality words, generic institution and role nouns,
months and weekdays are dropped ("Dr. Elena Marsh" -> "Elena Marsh", "Chief Technology
Officer Ana Diaz" -> "Ana Diaz"). A run made only of such words ("Japanese", "University",
"National Institute") is no name, and neither is a single capitalised word that the corpus
also uses in lower case (a common noun capitalised in a heading or a title). The universe's own lab and model names are excluded, and names
its text uses (its city, its regulators) are expected in many documents: ``world_text``
lists them as ``world_entities`` instead of counting them as invented.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from synthdocs.plan import type_key
from synthdocs.stats import Diversity, Entity

_TOKEN = re.compile(r"\w+")
_LOWER_WORD = re.compile(r"\b[a-z]+\b")
_TITLE_DOT = re.compile(r"\b(Dr|Mr|Mrs|Ms|Mx|Prof|Rev|Sen|Gov|Rep)\.\s+(?=[A-Z])")
_ENTITY = re.compile(r"(?<![.!?]\s)(?<!^)\b([A-Z][a-z]+(?:[ \t]+[A-Z][a-z]+){0,5})\b", re.MULTILINE)
_FUNCTION_WORDS = frozenset([
    "The", "This", "That", "These", "Those", "It", "Its", "In", "On", "At", "For", "And", "But", "Or", "If", "When",
    "While", "After", "Before", "During", "As", "By", "From", "With", "Of", "To", "I", "We", "You", "He", "She",
    "They", "My", "Our", "Your", "His", "Her", "Their", "A", "An", "Yet", "So", "Then", "Meanwhile", "However",
    "Dear", "Hello", "Hi", "Yes", "No", "Okay", "Thanks", "Regards", "Sincerely", "Best"
])
_TITLES = frozenset([
    "Dr", "Mr", "Mrs", "Ms", "Mx", "Prof", "Rev", "Sen", "Gov", "Rep", "Professor", "Doctor", "Sir", "Dame", "Lord",
    "Lady", "Judge", "Justice", "Senator", "Governor", "Mayor", "President", "Minister", "Secretary", "Chancellor",
    "Commissioner", "Chairman", "Chairwoman", "Chair", "Director", "Chief", "Captain", "General", "Officer",
    "Inspector", "Detective", "Sergeant", "Councillor", "Councilor", "Representative", "Congressman",
    "Congresswoman", "Ambassador", "Dean", "Editor", "Reverend", "Father", "Sister", "Uncle", "Aunt"
])
_CALENDAR = frozenset([
    "January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November",
    "December", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday", "Spring", "Summer",
    "Autumn", "Fall", "Winter"
])
_DEMONYMS_N = [  # each also taken with an -s plural
    "American", "African", "Asian", "European", "Australian", "Canadian", "Mexican", "Brazilian", "Chilean",
    "Peruvian", "Colombian", "Argentinian", "Venezuelan", "Cuban", "Jamaican", "Haitian", "German", "Italian",
    "Russian", "Ukrainian", "Belarusian", "Austrian", "Belgian", "Hungarian", "Romanian", "Bulgarian", "Serbian",
    "Croatian", "Bosnian", "Slovenian", "Slovakian", "Albanian", "Macedonian", "Estonian", "Latvian", "Lithuanian",
    "Norwegian", "Indian", "Indonesian", "Malaysian", "Iranian", "Jordanian", "Syrian", "Egyptian", "Nigerian",
    "Kenyan", "Ghanaian", "Ethiopian", "Tanzanian", "Ugandan", "Rwandan", "Algerian", "Tunisian", "Moroccan",
    "Libyan", "Korean", "Mongolian", "Tibetan", "Georgian", "Armenian", "Palestinian", "Singaporean", "Californian",
    "Texan", "Floridian", "Bostonian", "Parisian", "Londoner", "Berliner", "Scandinavian", "Latin", "Hispanic",
    "Caribbean", "Mediterranean", "Christian", "Republican", "Democrat", "Victorian", "Anglican", "Lutheran"
]
_DEMONYMS = frozenset([*_DEMONYMS_N, *(w + "s" for w in _DEMONYMS_N),
    "British", "Brits", "English", "French", "Irish", "Scottish", "Scots", "Welsh", "Dutch", "Spanish",
    "Portuguese", "Swiss", "Swedish", "Swedes", "Danish", "Danes", "Finnish", "Finns", "Polish", "Poles", "Czech",
    "Czechs", "Greek", "Greeks", "Turkish", "Turks", "Icelandic", "Chinese", "Japanese", "Vietnamese", "Taiwanese",
    "Burmese", "Nepalese", "Lebanese", "Sudanese", "Senegalese", "Congolese", "Maltese", "Thai", "Thais",
    "Filipino", "Filipinos", "Israeli", "Israelis", "Saudi", "Saudis", "Iraqi", "Iraqis", "Pakistani", "Pakistanis",
    "Bangladeshi", "Afghan", "Afghans", "Kuwaiti", "Qatari", "Emirati", "Yemeni", "Somali", "Somalis", "Zimbabwean",
    "Kiwi", "Kiwis", "Aussie", "Aussies", "Western", "Eastern", "Northern", "Southern", "Midwestern", "Arab",
    "Arabs", "Arabic", "Hebrew", "Hindi", "Mandarin", "Cantonese", "Jewish", "Muslim", "Muslims", "Catholic",
    "Catholics", "Protestant", "Buddhist", "Hindu", "Sikh", "Nordic", "Baltic", "Balkan", "Slavic", "Celtic",
    "Atlantic", "Pacific", "Arctic", "Federal", "National", "International", "Global", "Regional", "Royal",
    "Imperial", "Metropolitan"
])
_GENERIC = frozenset([
    "University", "Universities", "Institute", "Institutes", "College", "Colleges", "School", "Schools", "Academy",
    "Department", "Departments", "Ministry", "Ministries", "Agency", "Agencies", "Office", "Offices", "Bureau",
    "Commission", "Committee", "Committees", "Council", "Councils", "Board", "Boards", "Authority", "Authorities",
    "Administration", "Government", "Governments", "Parliament", "Congress", "Senate", "House", "Assembly", "Court",
    "Courts", "Tribunal", "Foundation", "Foundations", "Association", "Associations", "Society", "Societies",
    "Union", "Unions", "Federation", "League", "Center", "Centre", "Centers", "Centres", "Company", "Companies",
    "Corporation", "Corporations", "Inc", "Ltd", "Corp", "Co", "Group", "Groups", "Lab", "Labs", "Laboratory",
    "Laboratories", "Hospital", "Hospitals", "Clinic", "Museum", "Library", "Bank", "Banks", "Fund", "Funds",
    "Trust", "Times", "News", "Post", "Daily", "Weekly", "Review", "Journal", "Gazette", "Herald", "Tribune",
    "Press", "Magazine", "Report", "Reports", "Act", "Acts", "Bill", "Bills", "Law", "Laws", "Code", "Policy",
    "Policies", "Program", "Programs", "Programme", "Programmes", "Project", "Projects", "Initiative",
    "Initiatives", "Team", "Teams", "Division", "Unit", "Units", "Service", "Services", "Network", "Networks",
    "Alliance", "Coalition", "Partners", "Partnership", "Street", "Avenue", "Road", "Square", "Park", "City",
    "State", "States", "County", "Province", "Region", "District", "Kingdom", "Republic", "Nation", "Nations",
    "Public", "Private", "General", "Annual", "Research", "Technology", "Technologies", "Tech", "Science",
    "Sciences", "Studies", "Security", "Safety", "Ethics", "Affairs", "Health", "Education", "Energy", "Innovation",
    "Intelligence", "Artificial", "Digital", "Data", "Systems", "System", "Solutions", "Industries", "Industry",
    "Media", "Communications", "Operations", "Management", "Engineering", "Engineer", "Engineers", "Analyst",
    "Analysts", "Researcher", "Researchers", "Scientist", "Scientists", "Manager", "Managers", "Executive",
    "Executives", "Employee", "Employees", "Staff", "Member", "Members", "Customer", "Customers", "User", "Users",
    "Citizen", "Citizens", "Resident", "Residents", "Student", "Students", "Teacher", "Teachers", "Worker",
    "Workers", "Reader", "Readers", "Author", "Authors", "Section", "Chapter", "Part", "Article", "Appendix",
    "Figure", "Table", "Note", "Notes", "Update", "Updates", "Summary", "Introduction", "Conclusion", "Background",
    "Overview", "Memo", "Letter", "Email", "Statement", "Announcement", "Release", "Notice", "Guidelines", "Guide",
    "Handbook", "Manual", "Terms", "Conditions", "Agreement", "Contract", "Protocol", "Standard", "Standards",
    "Framework", "Model", "Models", "Version", "Edition", "Day", "Week", "Month", "Year", "Today", "Tomorrow",
    "Yesterday", "Morning", "Evening", "Night", "Mister", "Madam"
])
_NOT_NAMES = _FUNCTION_WORDS | _TITLES | _CALENDAR | _DEMONYMS | _GENERIC


def distinct_n(texts: list[str], n: int) -> float:
    total, unique = 0, set()
    for t in texts:
        toks = _TOKEN.findall(t.lower())
        grams = list(zip(*(toks[i:] for i in range(n)), strict=False))
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else 0.0


def lowercase_words(texts: list[str]) -> set[str]:
    """Every word that some text writes in lower case: what makes a lone capitalised word a common noun."""
    return {w for t in texts for w in _LOWER_WORD.findall(t)}


def _name(run: str, common: set[str]) -> str | None:
    """The name in a run of capitalised words, or None when the run names nothing."""
    words = run.split()
    while words and words[0] in _NOT_NAMES:
        words = words[1:]
    if not words:
        return None
    if len(words) == 1 and words[0].lower() in common:
        return None
    return " ".join(words)


def entities(text: str, exclude: set[str], common: set[str] | frozenset[str] = frozenset()) -> set[str]:
    """The invented names in ``text``: not in (or part of) ``exclude``, and no lone word of ``common``."""
    found = set()
    for m in _ENTITY.finditer(_TITLE_DOT.sub(r"\1 ", text)):
        name = _name(m.group(1), common)
        if name is None or name in exclude or any(name in e or e in name for e in exclude):
            continue
        found.add(name)
    return found


def by_type(docs: list[dict[str, Any]]) -> dict[str, int]:
    """Documents per type, most first; types that differ only in case count as one (in the first spelling)."""
    spelling: dict[str, str] = {}
    counts: Counter = Counter()
    for d in docs:
        key = type_key(d["doc_type"])
        spelling.setdefault(key, d["doc_type"])
        counts[key] += 1
    return {spelling[key]: n for key, n in counts.most_common()}


def diversity_stats(
    docs: list[dict[str, Any]], exclude_names: list[str], *, world_text: str = "", top_k: int = 15,
    max_entity_share: float = 0.2, min_distinct2: float = 0.25,
) -> Diversity:
    texts = [d["text"] for d in docs]
    exclude = {n for name in exclude_names for n in (name, *name.split()) if len(n) > 2}
    common = lowercase_words([*texts, world_text])
    world = entities(world_text, exclude, common) if world_text else set()
    doc_freq: Counter = Counter()
    world_freq: Counter = Counter()
    for t in texts:
        found = entities(t, exclude, common)
        doc_freq.update(found - world)
        world_freq.update(found & world)
    n = len(texts)

    def ranked(freq: Counter) -> list[Entity]:
        return [Entity(entity=e, documents=c, share=round(c / n, 4)) for e, c in freq.most_common(top_k)] if n else []

    stats = Diversity(
        documents=n,
        distinct_1=round(distinct_n(texts, 1), 4),
        distinct_2=round(distinct_n(texts, 2), 4),
        distinct_3=round(distinct_n(texts, 3), 4),
        top_entities=ranked(doc_freq),
        world_entities=ranked(world_freq),
        per_type=by_type(docs),
        per_fact=dict(Counter(d["fact_id"] for d in docs).most_common()),
        warnings=[],
    )
    top = stats.top_entities
    if n >= 20 and top and top[0].share > max_entity_share:
        stats.warnings.append(
            f"possible mode collapse: the invented name '{top[0].entity}' appears in {top[0].share:.0%} of "
            f"documents (limit {max_entity_share:.0%}); raise seed variety or prompt diversity"
        )
    if n >= 20 and stats.distinct_2 < min_distinct2:
        stats.warnings.append(f"low lexical diversity: distinct-2 = {stats.distinct_2:.2f} < {min_distinct2}")
    return stats
